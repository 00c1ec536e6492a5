"""Input and output on an object store, through the S3 protocol.

A real S3 API server (moto's, in a thread on a free port) stands in for S3: pyarrow's own S3
client talks HTTP to it exactly as to AWS, with the endpoint and credentials taken from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) as on a real cluster node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import masked_corpus, write_job, write_units
from rayinfer_tasks.fill_mask import FillMaskTask

from rayinfer.errors import OutputError
from rayinfer.io.folder import committed_coverage, prepare, read_manifest, write_manifest
from rayinfer.io.scan import scan
from rayinfer.io.store import MANIFEST, list_parts
from rayinfer.testing import run_task

moto_server = pytest.importorskip("moto.server")

BUCKET = "rayinfer-test"


@pytest.fixture(scope="module")
def s3_env():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3() -> pafs.S3FileSystem:
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def keys(prefix: str) -> list[str]:
    infos = s3().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.split("/", 1)[1] for i in infos if i.type == pafs.FileType.File)


def test_commit_resume_and_modes_on_s3(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the "crash" below leaves its local temp file there
    fs = s3()
    for i, n in enumerate([30, 0, 45]):
        ids = pa.array(range(i * 100, i * 100 + n), pa.int64())
        pq.write_table(pa.table({"id": ids}), f"{BUCKET}/commit/in/f{i}.parquet", filesystem=fs, row_group_size=10)
    files, _ = scan(f"s3://{BUCKET}/commit/in")
    assert [f.path for f in files] == [f"s3://{BUCKET}/commit/in/f{i}.parquet" for i in range(3)]
    out = f"s3://{BUCKET}/commit/out"
    prepare(out, "error")
    write_units(out, files, {}, 7, 100, stop_after=4)  # "crash" after 4 parts (a part per batch)
    first = {k: s3().get_file_info(f"{BUCKET}/{k}").mtime for k in keys("commit/out")}
    assert len(first) == 4 and all(k.startswith("commit/out/part-") for k in first)  # no temp objects: one PUT each

    with pytest.raises(OutputError, match="is not empty"):
        prepare(out, "error")
    prepare(out, "resume")
    coverage, done = committed_coverage(out)
    assert done == 28
    write_units(out, files, coverage, 11, 100)
    ids = sorted(pq.read_table(f"{BUCKET}/commit/out", filesystem=fs).column("id").to_pylist())
    assert ids == list(range(30)) + list(range(200, 245))
    assert {k: s3().get_file_info(f"{BUCKET}/{k}").mtime for k in first} == first  # committed parts untouched

    write_manifest(out, {"status": "complete"})
    assert read_manifest(out) == {"status": "complete"}
    assert MANIFEST not in list_parts(out) and len(list_parts(out)) == 4 + 1 + 5  # f0's last 2 rows, then f2's 45 in batches of 11

    # objects rayinfer did not write are never mixed with or deleted
    fs.create_dir(f"{BUCKET}/commit/out")
    with fs.open_output_stream(f"{BUCKET}/commit/out/notes.txt") as f:
        f.write(b"mine")
    with pytest.raises(OutputError, match=r"holds files rayinfer did not write \(notes.txt\)"):
        prepare(out, "overwrite")
    fs.delete_file(f"{BUCKET}/commit/out/notes.txt")
    prepare(out, "overwrite")
    assert keys("commit/out") == []


def test_missing_bucket_fails_at_validation(s3_env):
    with pytest.raises(OutputError, match="the bucket 'no-such-bucket' does not exist"):
        prepare("s3://no-such-bucket/out", "error", check_only=True)


@pytest.mark.slow
def test_fill_mask_job_reads_and_writes_s3(tmp_path, s3_env, rayinfer_bert):
    """The user's path: `rayinfer run` (its own embedded Ray, credentials from the environment)
    reads Parquet from S3 and commits its parts and manifest there."""
    corpus = masked_corpus(120)
    fs = s3()
    for i in range(2):
        half = {k: v[i * 60 : (i + 1) * 60] for k, v in corpus.items()}
        pq.write_table(pa.table(half), f"{BUCKET}/job/in/part-{i}.parquet", filesystem=fs, row_group_size=25)
    job = write_job(
        tmp_path / "job.yaml",
        task="fill-mask",
        model=str(rayinfer_bert),
        input={"path": f"s3://{BUCKET}/job/in", "id_column": "doc_id", "columns": {"text": "sentence"}},
        output={"path": f"s3://{BUCKET}/job/out"},
        options={"top_k": 2},
        runtime={"batch_size": 25, "actors": 1, "num_cpus": 1},
    )
    env = {**os.environ, **s3_env}
    run = [sys.executable, "-m", "rayinfer", "run", str(job), "--quiet"]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = pq.read_table(f"{BUCKET}/job/out", filesystem=fs)
    assert sorted(out.column("doc_id").to_pylist()) == corpus["doc_id"]
    assert out.column("error").null_count == 120
    by_id = {r["doc_id"]: r for r in out.to_pylist()}
    direct = run_task(FillMaskTask, [{"text": corpus["sentence"][i]} for i in (0, 59, 60, 119)], rayinfer_bert, {"top_k": 2})
    for i, d in zip((0, 59, 60, 119), direct):
        assert by_id[1000 + i]["filled"] == d["filled"]

    manifest = json.loads(fs.open_input_file(f"{BUCKET}/job/out/{MANIFEST}").read())
    assert manifest["status"] == "complete" and manifest["rows"] == 120
    assert sorted(manifest["parts"]) == [k.rsplit("/", 1)[1] for k in keys("job/out") if "/part-" in k]
    assert manifest["input"]["path"] == f"s3://{BUCKET}/job/in"

    # a second run refuses the non-empty output; --resume finds nothing left to do
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "is not empty" in again.stderr
    resumed = subprocess.run([*run, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(fs.open_input_file(f"{BUCKET}/job/out/{MANIFEST}").read())["rows_resumed"] == 120


@pytest.mark.slow
def test_credentials_in_a_uris_user_part_are_refused_before_ray_and_never_printed(tmp_path, s3_env):
    """`s3://KEY:SECRET@bucket/...` (a form pyarrow accepts) as output or input path, in the spec,
    through --set and to `rayinfer submit`: one line, exit 2, before Ray starts, the secret in no
    line and nothing written to the bucket."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    fs = s3()
    pq.write_table(pa.table({"id": [1, 2], "text": ["a [MASK] b", "c [MASK] d"]}), f"{BUCKET}/cred/in/a.parquet",
                   filesystem=fs)
    with_secret = f"s3://AKIAEXAMPLE:{secret}@{BUCKET}/cred/%s?endpoint_override={endpoint}"
    plain = f"s3://{BUCKET}/cred/%s?endpoint_override={endpoint}"
    job = write_job(tmp_path / "job.yaml", task="fill-mask", model="/nonexistent-model-not-reached",
                    input={"path": plain % "in"}, output={"path": with_secret % "out"})
    env = {**os.environ, **s3_env}
    runs = {
        "output in the spec": ["run", str(job)],
        "input through --set": ["run", str(job), "--set", f"output.path={plain % 'out'}",
                                "--set", f"input.path={with_secret % 'in'}"],
        "validate": ["validate", str(job)],
        "submit": ["submit", str(job), "--address", "http://127.0.0.1:9"],
    }
    for what, args in runs.items():
        proc = subprocess.run([sys.executable, "-m", "rayinfer", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 2, (what, said)
        assert secret not in said and "AKIAEXAMPLE" not in said, (what, said)
        lines = [ln for ln in said.splitlines() if ln.strip()]
        assert len(lines) == 1, (what, said)
        assert f"path 's3://***@{BUCKET}/cred/" in lines[0], (what, said)
        assert "carries credentials in the URI (the user part (before '@'))" in lines[0], (what, said)
    assert keys("cred/") == ["cred/in/a.parquet"]  # nothing written: no part, no manifest, no lock


def test_one_run_at_a_time_on_an_object_store(s3_env):
    """S3 has no exclusive create that pyarrow can ask for: a lease is written, left to settle and
    read back. Of runs taking it together exactly one holds it; a live holder refuses the next."""
    import threading

    from rayinfer.io.lock import LOCK, OutputLock, holder
    from rayinfer.io.store import Store

    store = Store(f"s3://{BUCKET}/locked/out")
    results: list[str] = []

    def take(i: int) -> None:
        try:
            lock = OutputLock.acquire(store, f"run-{i}")
        except OutputError as exc:
            results.append("refused" if "is in use by run run-" in str(exc) else str(exc))
            return
        results.append("won")
        time.sleep(3)
        lock.release()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "refused", "won"]
    assert holder(store) is None and LOCK not in keys("locked/out")
    with OutputLock.acquire(store, "later"):
        with pytest.raises(OutputError, match="is in use by run later"):
            prepare(f"s3://{BUCKET}/locked/out", "overwrite", check_only=True)
