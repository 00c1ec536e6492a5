"""Situations users meet every week that used to run and write noise, or destroy work, without a
word: a checkpoint saved without its tokenizer, a head transformers would initialise at random,
duplicate ids, two runs into one output folder. (Credentials in a URI's user part are refused in
test_object_store.py, against the S3 API server.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import fill_mask_job, write_job
from rayinfer_tasks.classify import ClassifyTask

from rayinfer.api import run_job
from rayinfer.cli import main
from rayinfer.errors import ModelError, OutputError
from rayinfer.io.lock import OutputLock, holder
from rayinfer.io.store import LOCK, Store, list_parts
from rayinfer.models.load import LoadContext, load_tokenizer
from rayinfer.testing import english_sentences, run_task


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rayinfer: error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(rayinfer_bert_classifier, tmp_path_factory) -> Path:
    """The classifier as a training checkpoint saves it: config and weights, no tokenizer files."""
    folder = tmp_path_factory.mktemp("checkpoint-500")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(rayinfer_bert_classifier / name, folder / name)
    return folder


def classify_job(tmp_path: Path, model: Path, rows: int = 100, **extra) -> Path:
    texts = [english_sentences()[i % len(english_sentences())] for i in range(rows)]
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts}), tmp_path / "in.parquet")
    spec = {"task": "classify", "model": str(model), "input": {"path": str(tmp_path / "in.parquet")},
            "output": {"path": str(tmp_path / "out")}, "runtime": {"batch_size": 32, "num_cpus": 1, "actors": 1}, **extra}
    return write_job(tmp_path / "job.yaml", **spec)


# --- a model folder without its tokenizer -----------------------------------------------------

def test_a_checkpoint_without_its_tokenizer_is_refused_by_validate_and_run_in_one_line(tmp_path, checkpoint):
    job = classify_job(tmp_path, checkpoint)
    for command in ("validate", "run"):
        line = one_error_line(cli(command, str(job)))
        assert f"model '{checkpoint}' has no tokenizer files in it" in line
        assert "Set tokenizer: to the folder or hub id of the model it was trained from" in line
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_the_base_model_gives_the_outputs_of_the_complete_folder(
        tmp_path, checkpoint, rayinfer_bert_classifier, ray_session):
    """The job on the checkpoint with ``tokenizer:`` set equals the task on the complete folder."""
    job = classify_job(tmp_path, checkpoint, rows=40, tokenizer=str(rayinfer_bert_classifier))
    assert cli("validate", str(job)).exit_code == 0
    manifest = run_job(job)
    assert manifest["identity"]["tokenizer"] == str(rayinfer_bert_classifier)
    out = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda r: r["id"])
    texts = pq.read_table(tmp_path / "in.parquet").column("text").to_pylist()
    direct = run_task(ClassifyTask, [{"text": t} for t in texts], rayinfer_bert_classifier)
    assert [r["label"] for r in out] == [d["label"] for d in direct]
    assert [r["score"] for r in out] == pytest.approx([d["score"] for d in direct], abs=1e-6)
    assert len({r["label"] for r in out}) > 1 or len({round(r["score"], 4) for r in out}) > 1  # not one constant


def test_a_tokenizer_folder_without_tokenizer_files_is_refused(tmp_path, checkpoint):
    line = one_error_line(cli("validate", str(classify_job(tmp_path, checkpoint)), "--set", f"tokenizer={checkpoint}"))
    assert f"tokenizer folder '{checkpoint}' has no tokenizer files" in line


def test_the_empty_fallback_tokenizer_is_refused_when_it_loads(checkpoint):
    """The guard in the actor, for what the planner cannot see (a hub model whose cache lacks the
    files, a plugin's own loading): transformers' fallback knows only its special tokens."""
    with pytest.raises(ModelError, match=r"knows only its 5 special tokens.*Set tokenizer:"):
        load_tokenizer(LoadContext(model=str(checkpoint)))


def test_a_head_transformers_would_initialise_at_random_is_refused(tmp_path, rayinfer_bert_classifier):
    """A bare encoder whose config names no architecture passes the planner's check, and
    transformers would give it a random classifier with a log line nobody reads."""
    from transformers import BertModel

    encoder = tmp_path / "encoder"
    BertModel.from_pretrained(rayinfer_bert_classifier).save_pretrained(encoder)
    config = json.loads((encoder / "config.json").read_text())
    config.pop("architectures")
    (encoder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(rayinfer_bert_classifier / name, encoder / name)
    with pytest.raises(ModelError, match=r"lacks weights that AutoModelForSequenceClassification needs "
                                         r"\(classifier.bias, classifier.weight\): transformers would initialise"):
        run_task(ClassifyTask, [{"text": "a sentence"}], encoder)


def test_a_bare_encoder_from_a_masked_lm_checkpoint_loads_and_only_its_pooler_is_warned_about(rayinfer_bert, caplog):
    """A masked-LM checkpoint has no pooler; a task reading hidden states (mean pooling) loads it
    as AutoModel and never uses the pooler: a warning, not a refusal."""
    from transformers import AutoModel

    from rayinfer.models.load import load_model

    with caplog.at_level("WARNING", logger="rayinfer"):
        model = load_model(LoadContext(model=str(rayinfer_bert)), AutoModel)
    assert type(model).__name__ == "BertModel"
    assert "has no pooler weights (pooler.dense.bias, pooler.dense.weight)" in caplog.text


# --- duplicate ids ----------------------------------------------------------------------------

def duplicate_inputs(tmp_path: Path, fmt: str) -> Path:
    texts = ["the cat sat [MASK] the mat", "a [MASK] day", "it rained [MASK]", "the [MASK] end", "one [MASK] more"]
    ids = [1, 2, 2, 3, 3]
    folder = tmp_path / "in"
    folder.mkdir()
    if fmt == "parquet":
        pq.write_table(pa.table({"doc_id": ids[:3], "sentence": texts[:3]}), folder / "a.parquet")
        pq.write_table(pa.table({"doc_id": ids[3:], "sentence": texts[3:]}), folder / "b.parquet")
    else:
        (folder / "a.jsonl").write_text("".join(json.dumps({"doc_id": i, "sentence": t}) + "\n" for i, t in zip(ids, texts)))
    return folder


@pytest.mark.parametrize("fmt, places", [("parquet", "id 2 at a.parquet rows 1 and 2; id 3 at b.parquet rows 0 and 1"),
                                         ("jsonl", "id 2 at a.jsonl rows 1 and 2; id 3 at a.jsonl rows 3 and 4")])
def test_duplicate_ids_are_refused_by_default_with_the_count_and_two_examples(tmp_path, rayinfer_bert, fmt, places):
    duplicate_inputs(tmp_path, fmt)
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus={"doc_id": [0], "sentence": ["x"], "source": ["s"]})
    shutil.rmtree(tmp_path / "in")
    duplicate_inputs(tmp_path, fmt)
    overrides = ["--set", "input.keep=[]"]
    line = one_error_line(cli("run", str(job), *overrides))
    assert f"2 row(s) repeat an id of another row (2 distinct id(s) in column 'doc_id' appear more than once), e.g. {places}" in line
    assert "set input.duplicate_ids: warn to run every row anyway" in line
    allowed = cli("validate", str(job), *overrides, "--set", "input.duplicate_ids=allow")
    assert allowed.exit_code == 0 and "repeat an id" not in allowed.output
    warned = cli("validate", str(job), *overrides, "--set", "input.duplicate_ids=warn")
    assert warned.exit_code == 0 and "note: 2 row(s) repeat an id of another row" in warned.output


def test_warn_runs_every_row_and_says_how_many_repeat(tmp_path, rayinfer_bert, ray_session, caplog):
    folder = duplicate_inputs(tmp_path, "jsonl")
    job = write_job(tmp_path / "job.yaml", task="fill-mask", model=str(rayinfer_bert),
                    input={"path": str(folder), "id_column": "doc_id", "columns": {"text": "sentence"},
                           "duplicate_ids": "warn"},
                    output={"path": str(tmp_path / "out")}, runtime={"num_cpus": 1, "actors": 1})
    with caplog.at_level("WARNING", logger="rayinfer"):
        manifest = run_job(job)
    assert any("2 row(s) repeat an id of another row" in r.getMessage() for r in caplog.records)
    assert manifest["rows"] == 5 and manifest["input"]["duplicate_id_rows"] == 2
    assert sorted(pq.read_table(tmp_path / "out").column("doc_id").to_pylist()) == [1, 2, 2, 3, 3]


# --- one run per output folder ----------------------------------------------------------------

def _race(folder: str, barrier, results) -> None:
    store = Store(folder)
    barrier.wait()
    try:
        lock = OutputLock.acquire(store, f"run-{os.getpid()}")
    except OutputError as exc:
        results.put(("refused", str(exc)))
        return
    results.put(("won", None))
    time.sleep(1.0)  # held while the others look
    lock.release()


def test_of_runs_taking_one_folders_lock_together_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):
        folder = str(tmp_path / f"out-{attempt}")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(folder, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sorted(o for o, _ in outcomes) == ["refused", "refused", "refused", "won"], outcomes
        assert all("is in use by run run-" in text for o, text in outcomes if o == "refused")
        assert not os.path.exists(os.path.join(folder, LOCK))  # released


def test_a_dead_runs_lock_is_taken_over_and_a_live_ones_is_not(tmp_path):
    store = Store(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    elsewhere = {"run_id": "20261207T100000Z-abc", "command": "run", "host": "another-host", "pid": 4242,
                 "token": "t1", "started_at": "2026-12-07T10:00:00+00:00"}
    store.put(LOCK, json.dumps({**elsewhere, "heartbeat_at": time.time() - 5}).encode())
    with pytest.raises(OutputError, match=r"is in use by run 20261207T100000Z-abc \(pid 4242 on host another-host\) "
                                          r"since 2026-12-07T10:00:00\+00:00, last heartbeat 5 s ago"):
        OutputLock.acquire(store, "mine")
    store.put(LOCK, json.dumps({**elsewhere, "heartbeat_at": time.time() - 61}).encode())  # its heartbeat stopped
    with OutputLock.acquire(store, "mine") as lock:
        assert holder(store)["run_id"] == "mine" and lock.lost is None
    assert holder(store) is None

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {**elsewhere, "host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat_at": time.time()}
    store.put(LOCK, json.dumps(here).encode())  # fresh, but its process on this host is gone (kill -9)
    with OutputLock.acquire(store, "mine-again"):
        assert holder(store)["run_id"] == "mine-again"


def test_a_holder_whose_lock_was_taken_over_does_not_finish(tmp_path, monkeypatch):
    import rayinfer.io.lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    store = Store(str(tmp_path / "out"))
    lock = OutputLock.acquire(store, "stalled")
    store.put(LOCK, json.dumps({"run_id": "newer", "token": "other", "heartbeat_at": time.time()}).encode())
    deadline = time.time() + 5
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(Exception, match="run newer .* took over output.path"):
        lock.check()
    lock.release()
    assert holder(store)["run_id"] == "newer"  # not ours to delete


@pytest.mark.slow
def test_two_runs_into_one_folder_one_runs_and_an_overwrite_meanwhile_is_refused(tmp_path, rayinfer_bert, ray_session):
    """Two `rayinfer run`s of one job started together: one runs, the other is refused in one line;
    while it runs, the same job with output.mode: overwrite (which would clear the folder under
    it) is refused too; every row comes out exactly once."""
    n = 3000
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=n, files=3, row_group_size=100,
                        runtime={"batch_size": 20, "actors": 1}, output={"part_rows": 100})
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rayinfer", "run", str(job), "--address", address, "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    both = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and not list_parts(out) and all(p.poll() is None for p in both):
        time.sleep(0.05)
    overwrite = subprocess.run([*cmd, "--set", "output.mode=overwrite"], capture_output=True, text=True, env=env,
                               timeout=120)
    running = holder(Store(str(out)))
    outputs = [p.communicate(timeout=300)[0] for p in both]
    codes = sorted(p.returncode for p in both)
    assert codes == [0, 2], outputs
    refused = next(o for p, o in zip(both, outputs) if p.returncode == 2)
    lines = [ln for ln in refused.splitlines() if ln.startswith("rayinfer:")]
    assert len(lines) == 1 and "is in use by run 20" in lines[0], refused
    assert running is not None, "the overwrite run was started after the first had finished"
    assert overwrite.returncode == 2, overwrite.stderr
    assert f"output.path '{out}' is in use by run {running['run_id']}" in overwrite.stderr
    assert len([ln for ln in overwrite.stderr.splitlines() if ln.startswith("rayinfer:")]) == 1
    ids = pq.read_table(out).column("doc_id").to_pylist()
    assert len(ids) == n and sorted(ids) == list(range(1000, 1000 + n))
    assert json.loads((out / "_manifest.json").read_text())["status"] == "complete" and not (out / LOCK).exists()
