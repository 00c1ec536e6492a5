"""Nothing lost: poisoned rows, an error-rate limit, an actor killed by pid, a driver killed
mid-run and resumed. All on the embedded Ray with real Parquet files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import assert_fill_mask_output, fill_mask_job, masked_corpus
from rayinfer_tasks.fill_mask import FillMaskTask

from rayinfer.api import run_job
from rayinfer.errors import RunError
from rayinfer.io.lock import holder
from rayinfer.io.store import MANIFEST, Store, list_parts
from rayinfer.testing import run_task

ONE_MB = "word " * 209_716 + "[MASK]"  # ~1 MB, the mask far beyond any model limit


def poisoned_corpus(n: int) -> tuple[dict, dict[int, str | None]]:
    """n rows, 5% poisoned. Returns the corpus and, per poisoned id, the expected error (None: the
    row must be processed normally)."""
    corpus = masked_corpus(n)
    expected: dict[int, str | None] = {}
    kinds = [
        (None, "(column 'sentence') is null"),
        ("", "(column 'sentence') is empty"),
        (ONE_MB, "lies beyond the 128-token limit"),
        (b"caf\xe9 au [MASK] \xff\xfe".decode("utf-8", errors="replace"), None),  # invalid UTF-8, replaced
        ("tab\there, bell\x07, nul\x00, escape\x1b [MASK] and DEL\x7f", None),  # control characters
    ]
    for j, i in enumerate(range(0, n, 20)):
        text, error = kinds[j % len(kinds)]
        corpus["sentence"][i] = text
        expected[corpus["doc_id"][i]] = error
    return corpus, expected


def test_poisoned_rows_get_errors_and_every_other_row_is_right(tmp_path, rayinfer_bert, ray_session):
    n = 400
    corpus, expected = poisoned_corpus(n)
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus=corpus, files=3, row_group_size=50, runtime={"batch_size": 40})
    manifest = run_job(job)
    assert manifest["rows"] == n and manifest["errors"] == sum(1 for e in expected.values() if e)
    assert manifest["errors_this_run_by_kind"] == {"null_input": 4, "empty_input": 4, "too_long": 4}

    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == corpus["doc_id"]
    for doc_id, error in expected.items():
        if error:
            assert error in rows[doc_id]["error"] and rows[doc_id]["predictions"] is None
    # every row that is not an error equals the task run directly on that row alone
    good = [i for i, d in enumerate(corpus["doc_id"]) if not expected.get(d)]
    direct = run_task(FillMaskTask, [{"text": corpus["sentence"][i]} for i in good], rayinfer_bert, {"top_k": 3})
    for i, d in zip(good, direct):
        got = rows[corpus["doc_id"][i]]
        assert got["error"] is None and got["filled"] == d["filled"]
        assert [[c["token_id"] for c in m] for m in got["predictions"]] == [[c["token_id"] for c in m] for m in d["predictions"]]


@pytest.mark.slow
def test_max_error_rate_aborts_with_a_clear_message(tmp_path, rayinfer_bert, ray_session):
    corpus = masked_corpus(400)
    for i in range(0, 400, 20):  # 5% null rows
        corpus["sentence"][i] = None
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus=corpus, files=2, runtime={"batch_size": 40, "max_error_rate": 0.01})
    with pytest.raises(RunError, match=r"aborted: \d+ of \d+ rows failed .* over runtime.max_error_rate 1.0%"):
        run_job(job)
    assert not (tmp_path / "out" / MANIFEST).exists()  # not marked complete
    # under the limit it completes
    ok = run_job(job, ["runtime.max_error_rate=0.05", "output.mode=overwrite"])
    assert ok["status"] == "complete" and ok["errors"] == 20


def task_actor_pids() -> list[int]:
    """rayinfer's actor processes of this test session's Ray (its raylet is our child process)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "TaskActor" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_every_id_comes_out_once(tmp_path, rayinfer_bert, ray_session):
    n = 3000
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=n, files=3, row_group_size=100, runtime={"batch_size": 20, "actors": 1})
    out = tmp_path / "out"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = task_actor_pids()
            if pids and len(list_parts(out)) >= 3:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    manifest = run_job(job)
    thread.join()
    assert killed, "the actor was never seen running"
    assert manifest["rows"] == n and manifest["errors"] == 0
    ids = pq.read_table(out).column("doc_id").to_pylist()
    assert len(ids) == n and sorted(ids) == list(range(1000, 1000 + n))
    pids = {a.split(":")[1] for a in manifest["actors"]}
    assert pids - {str(killed[0])}, manifest["actors"]  # a replacement actor did the rest


@pytest.mark.slow
def test_a_killed_driver_resumes_exactly_once_without_recomputing_committed_parts(tmp_path, rayinfer_bert, ray_session):
    """`kill -9` of a driver mid-run (it joined the session's Ray), then --resume: the dead driver's
    lock is taken over, no committed part is rewritten, every row comes out once and equals the
    task run on it directly (the resumed rows as much as the committed ones). The same crash and
    resume over every input format, and over small files packed into units, is checked at the
    unit loop's level in test_properties.py::test_commit_then_crash_then_resume..."""
    n = 3000
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=n, files=3, row_group_size=100,
                        runtime={"batch_size": 20, "actors": 1})
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "rayinfer", "run", str(job), "--address", address, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.time() + 180
    while time.time() < deadline and len(list_parts(out)) < 5 and driver.poll() is None:
        time.sleep(0.02)
    assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    committed = {name: (out / name).stat().st_mtime_ns for name in list_parts(out)}
    committed_rows = sum(pq.read_metadata(out / name).num_rows for name in committed)
    assert 0 < committed_rows < n and not (out / MANIFEST).exists()
    assert holder(Store(str(out)))["pid"] == driver.pid  # the dead driver's lock, left behind

    manifest = run_job(job, resume=True)  # takes the lock over at once: its process on this host is gone
    assert manifest["rows"] == n and manifest["rows_resumed"] >= committed_rows
    assert manifest["rows_resumed"] + manifest["rows_this_run"] == n
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == committed  # none recomputed
    assert json.loads((out / MANIFEST).read_text())["status"] == "complete" and holder(Store(str(out))) is None
    assert_fill_mask_output(out, masked_corpus(n), rayinfer_bert)


def damage_row_group(path, row_group: int, column: str) -> None:
    """Overwrite bytes inside one row group's column chunk, leaving the footer intact."""
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(row_group)
    chunk = next(rg.column(j) for j in range(md.num_columns) if rg.column(j).path_in_schema == column)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 12
    data[start:start + 40] = b"\xab" * 40
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_row_group_stops_the_run_in_one_line_and_skip_finishes_it(tmp_path, rayinfer_bert, ray_session):
    """Footer fine, one row group's data damaged: one rayinfer line naming file and row group,
    exit 3, the units read before it committed, no temp files; resumed with
    input.on_unreadable: skip, that row group's 25 rows become error rows and every other row
    comes out exactly once."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=300, files=3, row_group_size=25,
                        runtime={"batch_size": 25, "actors": 1}, output={"part_rows": 25})
    damaged = sorted((tmp_path / "in").glob("*.parquet"))[1]
    damage_row_group(damaged, 2, "sentence")
    env = {**os.environ, "RAYINFER_HOME": str(tmp_path / "home")}
    address = ray_session.get_runtime_context().gcs_address  # a driver joining the session's Ray
    proc = subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet", "--address", address],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayinfer: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = errors[0]
    assert f"input file '{damaged}', row group 2 (rows 50-74) cannot be read: " in line
    assert f"committed parts stay in {tmp_path / 'out'}" in line
    assert f"Once fixed, resume: rayinfer run {job} --resume --address {address}" in line
    log_file = line.split("full traceback in ")[1].split(". Once fixed")[0]
    assert log_file.startswith(str(tmp_path / "home" / "logs")) and "Traceback" in open(log_file).read()
    out = tmp_path / "out"
    assert list_parts(out) and not (out / MANIFEST).exists()
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())

    manifest = run_job(job, ["input.on_unreadable=skip"], resume=True)
    assert manifest["rows"] == 300 and manifest["errors"] == 25
    assert manifest["errors_this_run_by_kind"] == {"unreadable": 25}
    table = pq.read_table(out)
    unreadable = table.filter(pc.is_null(table.column("doc_id")))
    assert unreadable.num_rows == 25 and set(unreadable.column("error").to_pylist()) == {
        line.split("rayinfer: error: ")[1].split("; committed parts")[0]}
    ids = table.column("doc_id").drop_null().to_pylist()
    assert sorted(ids) == [i for i in range(1000, 1300) if not 1150 <= i < 1175]


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KB tmpfs (needs root, as in CI and here; skipped elsewhere), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, rayinfer_bert, small_disk, ray_session):
    """Output on a disk that fills up mid-run: one rayinfer line, exit 3, committed parts kept, no
    temporary file left; once the disk has room, --resume covers every row exactly once."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=1500, files=3, row_group_size=25,
                        runtime={"batch_size": 25, "actors": 1}, output={"path": str(small_disk / "out"), "part_rows": 25})
    env = {**os.environ, "RAYINFER_HOME": str(tmp_path / "home")}
    address = ray_session.get_runtime_context().gcs_address  # drivers joining the session's Ray
    run = [sys.executable, "-m", "rayinfer", "run", str(job), "--quiet", "--address", address]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayinfer: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"rayinfer: error: no space left on the device holding {small_disk / 'out'}")
    out = small_disk / "out"
    committed = {name: (out / name).stat().st_mtime_ns for name in list_parts(out)}
    assert committed and not (out / MANIFEST).exists() and not any((out / ".tmp").iterdir())

    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
    proc = subprocess.run([*run, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == committed
    assert_fill_mask_output(out, masked_corpus(1500), rayinfer_bert)


@pytest.mark.slow
def test_sigterm_stops_a_run_with_exit_130_and_resume_finishes_it_exactly_once(tmp_path, rayinfer_bert, ray_session):
    """SIGTERM (a scheduler, `kill`) to a driver that joined the session's Ray; the embedded
    driver's stop, by the same handler, is the Ctrl-C test's."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=3000, files=3, row_group_size=100,
                        runtime={"batch_size": 20, "actors": 1}, output={"part_rows": 100})
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet", "--address", address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list_parts(out)) < 3 and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read()[-3000:]
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr[-3000:]
    assert f"Resume: rayinfer run {job} --resume --address {address}" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and not (out / MANIFEST).exists()
    committed = {name: (out / name).stat().st_mtime_ns for name in list_parts(out)}
    for name in committed:  # every visible part is complete
        assert pq.read_metadata(out / name).num_rows > 0

    manifest = run_job(job, resume=True)
    assert manifest["rows"] == 3000 and manifest["rows_resumed"] + manifest["rows_this_run"] == 3000
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == committed
    assert_fill_mask_output(out, masked_corpus(3000), rayinfer_bert)


@pytest.mark.slow
def test_ctrl_c_commits_the_rows_in_hand_and_a_second_stops_at_once(tmp_path, rayinfer_bert):
    """Ctrl-C in a terminal signals the whole process group (driver and Ray's workers): the first
    stops the run cleanly (the actor commits what it holds, exit 130, how far it got and how to
    resume), a second one during that stop ends it at once; resumes cover every row once."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=3000, files=3, row_group_size=100,
                        runtime={"batch_size": 20, "actors": 1}, output={"part_rows": 100})
    out = tmp_path / "out"

    def interrupt(times: int) -> str:
        before = set(list_parts(out))
        driver = subprocess.Popen([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet", "--resume"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and len(set(list_parts(out)) - before) < 2 and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        for _ in range(times):
            os.killpg(driver.pid, signal.SIGINT)
            time.sleep(0.2)
        _, stderr = driver.communicate(timeout=120)
        assert driver.returncode == 130, stderr[-3000:]
        assert f"Resume: rayinfer run {job} --resume" in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert not (out / MANIFEST).exists() and not any((out / ".tmp").iterdir())
        for name in list_parts(out):  # every visible part is complete
            assert pq.read_metadata(out / name).num_rows > 0
        return stderr

    first = interrupt(1)
    assert "rayinfer: stopping: the actors commit the rows they hold" in first
    stopped = [line for line in first.splitlines() if line.startswith("rayinfer: stopped: ")]
    assert len(stopped) == 1, first[-3000:]
    committed = int(stopped[0].split("rayinfer: stopped: ")[1].split()[0])
    rows = sum(pq.read_metadata(out / name).num_rows for name in list_parts(out))
    assert committed == rows and 200 <= rows < 3000  # two whole parts and what the actor held, committed
    assert f"a resume does the other {3000 - rows}" in stopped[0]

    second = interrupt(2)
    assert "rayinfer: interrupted: the committed parts stay in the output folder" in second

    manifest = run_job(job, resume=True)
    assert manifest["rows"] == 3000 and manifest["rows_resumed"] + manifest["rows_this_run"] == 3000
    assert_fill_mask_output(out, masked_corpus(3000), rayinfer_bert)


CRASHY = '''
import os
import shutil
import signal

from rayinfer import hookimpl
from rayinfer_tasks.fill_mask import FillMaskTask


class CrashyFillMask(FillMaskTask):
    name = "crashy-fill-mask"
    description = "fill-mask, except that a text holding KILL-THIS-WORKER kills its process, as a segfault would."

    def preprocess(self, batch):
        if any("KILL-THIS-WORKER" in (text or "") for text in batch["text"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().preprocess(batch)


@hookimpl
def register_tasks(register):
    register(CrashyFillMask)
'''


@pytest.mark.slow
def test_a_row_that_kills_its_worker_is_isolated_and_retry_errors_fixes_it(tmp_path, rayinfer_bert, ray_session,
                                                                          monkeypatch, request):
    """A task that kills its own process on a marker row: Ray restarts the actor and reruns the
    unit; rayinfer pins each death on the batch in flight, halves it until the row is alone, and
    gives that row a worker_crash error, every other row its output. With the marker removed from
    the input, `rayinfer retry-errors` reruns only the error rows: the fixed row gets its output,
    a null row keeps its error, every other row and part stays byte for byte as it was. Both
    commands run in this process on the session's Ray (the plugin installed as pip leaves it, found
    through its entry point; its module goes to the actors by value)."""
    import importlib

    import ray.cloudpickle
    from click.testing import CliRunner
    from test_plugins import install_fake_dist

    from rayinfer.cli import main

    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-crashy", "rayinfer_crashy", CRASHY)
    monkeypatch.syspath_prepend(str(site))
    crashy = importlib.import_module("rayinfer_crashy")
    ray.cloudpickle.register_pickle_by_value(crashy)
    request.addfinalizer(lambda: (ray.cloudpickle.unregister_pickle_by_value(crashy), sys.modules.pop(crashy.__name__)))
    corpus = masked_corpus(120)
    corpus["sentence"][45] = "KILL-THIS-WORKER " + corpus["sentence"][45]
    corpus["sentence"][100] = None
    # units of 30 rows, batches of 4: row 45 is the last of the batch 42-45
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus=corpus, files=2, task="crashy-fill-mask",
                        runtime={"batch_size": 4, "actors": 1, "worker_crash_retries": 0})
    ran = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert ran.exit_code == 0, ran.output[-3000:]
    assert "120 rows (120 this run, 0 resumed), 2 with errors" in ran.output
    out = tmp_path / "out"
    manifest = json.loads((out / MANIFEST).read_text())
    # the unwatched first attempt, then batches 42-45, 44-45 and row 45 alone
    assert manifest["worker_deaths"] == 4
    assert manifest["errors_this_run_by_kind"] == {"worker_crash": 1, "null_input": 1}
    rows = {r["doc_id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == corpus["doc_id"]
    assert rows[1045]["error"].startswith("this row killed the worker process running it, also when run alone (1x)")
    assert rows[1045]["predictions"] is None and rows[1045]["source"] == corpus["source"][45]
    good = [i for i in range(120) if i not in (45, 100)]
    direct = run_task(FillMaskTask, [{"text": corpus["sentence"][i]} for i in good], rayinfer_bert, {"top_k": 3})
    for i, d in zip(good, direct):
        assert rows[corpus["doc_id"][i]]["error"] is None and rows[corpus["doc_id"][i]]["filled"] == d["filled"]

    # fix the input in place (same rows, same places), then retry only the error rows
    fixed_file = sorted((tmp_path / "in").glob("*.parquet"))[0]
    table = pq.read_table(fixed_file)
    texts = [t.replace("KILL-THIS-WORKER ", "") if t else t for t in table.column("sentence").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("sentence"), "sentence", pa.array(texts)), fixed_file)
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    retried = CliRunner().invoke(main, ["retry-errors", str(out), "--quiet"])
    assert retried.exit_code == 0, retried.output[-3000:]
    assert ("rayinfer: retried 2 rows with errors in 2 parts: 1 fixed, 1 failed again {'null_input': 1}; "
            "1 of 120 rows have errors now") in retried.output, retried.output
    after = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    changed = sorted(n for n in before if before[n] != after[n])
    assert after.keys() == before.keys() and len(changed) == 2
    now = {r["doc_id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(now) == corpus["doc_id"]  # every row exactly once
    [fixed] = run_task(FillMaskTask, [{"text": texts[45]}], rayinfer_bert, {"top_k": 3})
    assert now[1045]["error"] is None and now[1045]["filled"] == fixed["filled"] and now[1045]["source"] == corpus["source"][45]
    assert now[1100]["error"] == rows[1100]["error"]
    assert {k: v for k, v in now.items() if k != 1045} == {k: v for k, v in rows.items() if k != 1045}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["errors"] == 1 and manifest["rows"] == 120 and manifest["worker_deaths"] == 4  # the first run's
    [retry] = manifest["retries"]
    assert retry["rows_retried"] == 2 and retry["rows_fixed"] == 1 and retry["errors_by_kind"] == {"null_input": 1}
    for name in changed:
        made = json.loads(pq.read_metadata(out / name).metadata[b"rayinfer"])
        assert made["run_id"] == manifest["run_id"] and made["retries"][0]["run_id"] == retry["run_id"]


@pytest.mark.slow
def test_a_model_that_fails_to_load_in_the_actors_is_one_line_and_resume_finishes(tmp_path, rayinfer_bert, ray_session):
    """Weights damaged after validation (the file cut short, the config intact):
    the actors cannot load them; the run (a driver joining the session's Ray) ends with one
    rayinfer line naming the model and the loader's error, exit 3; with the weights restored,
    --resume covers every row once. (The embedded path's load failure: the unpickling test below.)"""
    model = tmp_path / "model"
    shutil.copytree(rayinfer_bert, model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    job = fill_mask_job(tmp_path, model, rows=40)
    weights.write_bytes(good[: len(good) // 2])
    env = {**os.environ, "RAYINFER_HOME": str(tmp_path / "home")}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet", "--address", address],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayinfer: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"rayinfer: error: the model '{model}' failed to load in an actor on ")
    assert ": SafetensorError: " in errors[0]
    assert f"Once fixed, resume: rayinfer run {job} --resume --address {address}" in errors[0]
    weights.write_bytes(good)
    manifest = run_job(job, resume=True)
    assert manifest["rows"] == 40 and sorted(pq.read_table(tmp_path / "out").column("doc_id").to_pylist()) == list(range(1000, 1040))


@pytest.mark.slow
def test_weights_torch_will_not_unpickle_end_the_run_in_one_line_and_their_payload_never_runs(tmp_path, rayinfer_bert):
    """A model whose only weights are a pickle carrying code (torch's safe loader refuses it):
    every actor fails to load it once (not restarted into the same failure); the user sees
    exactly one rayinfer line saying what to do, no traceback on stdout or stderr, and the code
    in the pickle never runs. The full traceback is in the log file the line names."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PAYLOAD-RAN'}",))

    model = tmp_path / "model"
    shutil.copytree(rayinfer_bert, model)
    (model / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, model / "pytorch_model.bin")
    job = fill_mask_job(tmp_path, model, rows=40)
    env = {**os.environ, "RAYINFER_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayinfer: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"rayinfer: error: the model '{model}' failed to load in an actor on ")
    assert ("its weights are a pickle file that torch will not load safely" in errors[0]
            and "convert them to safetensors" in errors[0]), errors[0]
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both and "(MapWorker" not in both and "Failed to apply UDF" not in both, both[-3000:]
    assert not (tmp_path / "PAYLOAD-RAN").exists()
    [log] = re.findall(r"full traceback in (\S+) on ", errors[0])
    assert "UnpicklingError" in Path(log).read_text()
