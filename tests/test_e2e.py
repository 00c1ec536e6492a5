"""End-to-end jobs on the embedded Ray: Parquet in, Parquet out, exact rows and ids."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import assert_fill_mask_output, fill_mask_job, masked_corpus
from rayinfer_tasks.fill_mask import FillMaskTask

from rayinfer.api import run_job
from rayinfer.errors import OutputError
from rayinfer.testing import run_task


def test_fill_mask_job_over_many_files(tmp_path, rayinfer_bert, ray_session):
    """1200 rows in 4 files on the default pool (runtime.actors unset: as many 1-CPU actors as the
    embedded Ray holds, 2 here; the suite's other jobs run one actor where the pool is not what
    they test)."""
    rows = 1200
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=rows, files=4, runtime={"batch_size": 100, "actors": None})
    manifest = run_job(job)

    out = pq.read_table(tmp_path / "out")  # the folder reads as one dataset: the manifest is hidden
    assert out.num_rows == rows
    ids = out.column("doc_id").to_pylist()
    assert sorted(ids) == list(range(1000, 1000 + rows))  # exactly one row per input id
    corpus = masked_corpus(rows)
    by_id = {r["doc_id"]: r for r in out.to_pylist()}
    assert all(by_id[i]["source"] == s for i, s in zip(corpus["doc_id"], corpus["source"]))  # keep column intact
    assert out.schema.names == ["doc_id", "source", "predictions", "filled", "error"]
    assert out.column("error").null_count == rows

    # outputs equal the task run directly, without Ray
    sample = [0, 1, 599, 1199]
    direct = run_task(FillMaskTask, [{"text": corpus["sentence"][i]} for i in sample], rayinfer_bert, {"top_k": 3})
    for i, d in zip(sample, direct):
        got = by_id[1000 + i]
        assert [[c["token_id"] for c in m] for m in got["predictions"]] == [[c["token_id"] for c in m] for m in d["predictions"]]
        assert got["filled"] == d["filled"]

    on_disk = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["rows"] == rows and on_disk["errors"] == 0
    assert on_disk["input"] == {"path": str(tmp_path / "in"), "files": 4, "rows": rows, "resolved": str(tmp_path / "in"),
                                "duplicate_id_rows": 0}
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == sorted(on_disk["parts"])
    assert manifest["run_id"] == on_disk["run_id"] and on_disk["versions"]["ray"]
    assert on_disk["rows_per_s"] > 0 and on_disk["duration_s"] > 0

    meta = pq.read_metadata(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    provenance = json.loads(meta[b"rayinfer"])
    assert provenance["task"] == "fill-mask" and provenance["model"] == str(rayinfer_bert)
    assert provenance["options"] == {"top_k": 3, "max_length": None, "truncate": True}
    assert provenance["rayinfer_version"] and provenance["adapter"] is None


def test_bad_rows_and_resume_and_modes(tmp_path, rayinfer_bert, ray_session):
    corpus = masked_corpus(300)
    for i in range(0, 300, 20):  # 5% poisoned rows
        corpus["sentence"][i] = [None, "", "no mask at all", "\x00\x01 [MASK] \x7f"][i // 20 % 4]
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus=corpus, files=3, row_group_size=40)

    first = run_job(job)
    assert first["rows"] == 300 and first["errors"] == 12  # null, empty, no-mask rows; control chars are fine
    assert first["errors_this_run_by_kind"] == {"null_input": 4, "empty_input": 4, "no_mask": 4}
    with pytest.raises(OutputError, match="is not empty"):
        run_job(job)

    # simulate a run killed half-way: drop half the parts and the manifest, then resume
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in parts[: len(parts) // 2]}
    for p in parts[len(parts) // 2 :]:
        p.unlink()
    (tmp_path / "out" / "_manifest.json").unlink()
    resumed = run_job(job, resume=True)
    assert resumed["rows"] == 300 and resumed["rows_resumed"] + resumed["rows_this_run"] == 300
    assert 0 < resumed["rows_this_run"] < 300 and resumed["errors"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet") if p.name in kept} == kept
    assert_fill_mask_output(tmp_path / "out", corpus, rayinfer_bert)  # the resumed rows as the kept ones

    # resume of a finished run does nothing; overwrite starts again
    again = run_job(job, resume=True)
    assert again["rows_this_run"] == 0 and again["rows"] == 300
    fresh = run_job(job, ["output.mode=overwrite"])
    assert fresh["rows_this_run"] == 300 and fresh["rows_resumed"] == 0
