"""retry-errors' pieces without Ray: reading given input rows, replacing rows in a part
atomically, and refusing another job's output (the end-to-end retry is in test_faults.py)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import fill_mask_job

from rayinfer.errors import OutputError, RunError, SpecError
from rayinfer.io.folder import write_manifest
from rayinfer.io.parts import PartWriter, part_coverage, part_name, replace_rows
from rayinfer.io.ranges import rows_to_ranges
from rayinfer.io.rows import read_rows
from rayinfer.io.scan import scan
from rayinfer.io.store import MANIFEST, Store
from rayinfer.plan.job import plan_job
from rayinfer.plan.retry import error_units, plan_retry
from rayinfer.testing import write_dataset


def test_read_rows_decodes_only_the_groups_it_needs_and_batches_them(tmp_path):
    write_dataset(tmp_path / "in", {"id": list(range(100)), "text": [f"t{i}" for i in range(100)]}, row_group_size=10)
    [f], _ = scan(str(tmp_path / "in"))
    wanted = [0, 9, 10, 35, 36, 37, 99]
    got = list(read_rows(f, rows_to_ranges(wanted), ["id", "text"], batch_rows=3))
    assert [t.num_rows for t, _, _ in got] == [3, 3, 1]
    assert [i for t, _, _ in got for i in t.column("id").to_pylist()] == wanted
    assert [i for _, r, _ in got for i in r.to_pylist()] == wanted
    with pytest.raises(Exception, match="has 100 rows now; row 100 is gone"):
        list(read_rows(f, rows_to_ranges([5, 100]), ["id"]))


def _part(store: Store, ids: list[int], errors: list[str | None]) -> tuple[str, pa.Schema]:
    schema = pa.schema([("id", pa.int64()), ("label", pa.string()), ("error", pa.string())])
    writer = PartWriter(store, schema, {"run_id": "first"}, 1 << 30)
    table = pa.table({"id": ids, "label": [None if e else f"l{i}" for i, e in zip(ids, errors)], "error": errors},
                     schema=schema)
    writer.write("/data/in.parquet", table, pa.array(range(len(ids)), pa.int64()), "10:1")
    [(name, _)] = writer.close()
    return name, schema


def test_replace_rows_swaps_only_the_given_rows_and_keeps_the_footer(tmp_path):
    store = Store(str(tmp_path / "out"))
    name, schema = _part(store, [7, 8, 9, 10], [None, "boom", None, "bad"])
    new = pa.table({"id": [8, 10], "label": ["fixed", None], "error": [None, "still bad"]}, schema=schema)
    replace_rows(store, name, [("/data/in.parquet", 1), ("/data/in.parquet", 3)], new, schema, "id",
                 {"run_id": "retry", "rows": 2}, {"/data/in.parquet": "11:2"})
    got = pq.read_table(tmp_path / "out" / name)
    assert got.to_pylist() == [{"id": 7, "label": "l7", "error": None}, {"id": 8, "label": "fixed", "error": None},
                               {"id": 9, "label": "l9", "error": None}, {"id": 10, "label": None, "error": "still bad"}]
    assert part_coverage(store, name) == {"/data/in.parquet": [(0, 4)]}
    made = json.loads(pq.read_metadata(tmp_path / "out" / name).metadata[b"rayinfer"])
    assert made["run_id"] == "first" and made["retries"] == [{"run_id": "retry", "rows": 2}]
    assert made["inputs"] == {"/data/in.parquet": "11:2"}
    assert not list((tmp_path / "out" / ".tmp").iterdir())


def test_replace_rows_refuses_rows_that_are_not_the_same_rows(tmp_path):
    store = Store(str(tmp_path / "out"))
    name, schema = _part(store, [7, 8, 9], [None, "boom", None])
    before = (tmp_path / "out" / name).read_bytes()
    new = pa.table({"id": [80], "label": ["x"], "error": [None]}, schema=schema)
    with pytest.raises(RunError, match=r"input row 1 of '/data/in.parquet' now has id 80, the part holds 8 there: the "
                                       "input file changed"):
        replace_rows(store, name, [("/data/in.parquet", 1)], new, schema, "id", {"run_id": "retry"})
    assert (tmp_path / "out" / name).read_bytes() == before


def test_a_part_of_packed_small_files_names_each_files_rows_and_retry_finds_them(tmp_path):
    """Three small files in one part, file after file: the footer's coverage per file in that
    order, every file's fingerprint, and error rows replaced across files by coordinates."""
    store = Store(str(tmp_path / "out"))
    schema = pa.schema([("id", pa.int64()), ("label", pa.string()), ("error", pa.string())])
    writer = PartWriter(store, schema, {"run_id": "first"}, 1 << 30)
    for file, ids, errors in [("/d/b.parquet", [1, 2], [None, "x"]), ("/d/a.parquet", [3], ["y"]),
                              ("/d/c.parquet", [4, 5], [None, None])]:
        table = pa.table({"id": ids, "label": [None if e else "ok" for e in errors], "error": errors}, schema=schema)
        writer.write(file, table, pa.array([10 + k for k in range(len(ids))], pa.int64()), f"fp-{file[3]}")
    with pytest.raises(RuntimeError, match="reached the part writer after another file's"):
        writer.write("/d/a.parquet", table, pa.array([20], pa.int64()))
    [(name, rows)] = writer.close()
    assert rows == 5 and name == part_name("/d/b.parquet", 10)
    assert list(part_coverage(store, name).items()) == [("/d/b.parquet", [(10, 12)]), ("/d/a.parquet", [(10, 11)]),
                                                        ("/d/c.parquet", [(10, 12)])]
    made = json.loads(pq.read_metadata(tmp_path / "out" / name).metadata[b"rayinfer"])
    assert made["inputs"] == {"/d/a.parquet": "fp-a", "/d/b.parquet": "fp-b", "/d/c.parquet": "fp-c"}
    new = pa.table({"id": [2, 3], "label": ["fixed", "fixed"], "error": [None, None]}, schema=schema)
    replace_rows(store, name, [("/d/b.parquet", 11), ("/d/a.parquet", 10)], new, schema, "id", {"run_id": "retry"})
    assert pq.read_table(tmp_path / "out" / name).column("label").to_pylist() == ["ok", "fixed", "fixed", "ok", "ok"]
    with pytest.raises(RunError, match="does not hold input rows"):
        replace_rows(store, name, [("/d/c.parquet", 12)], new.slice(0, 1), schema, "id", {"run_id": "retry"})


def test_retry_errors_refuses_an_unfinished_output_and_another_job(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=20)
    with pytest.raises(OutputError, match="does not exist"):
        plan_retry(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="has no _manifest.json: only a finished run's errors can be retried"):
        plan_retry(str(tmp_path / "out"))
    plan = plan_job(job)
    write_manifest(str(tmp_path / "out"), {"spec": plan.spec.to_dict(), "identity": plan.identity(),
                                           "input": {"path": str(tmp_path / "in")}})
    again, _ = plan_retry(str(tmp_path / "out"), ["options.top_k=5"])  # options may change
    assert again.options.top_k == 5 and again.spec.output.mode == "resume"
    assert error_units(Store(str(tmp_path / "out")), again) == ([], 0)
    shutil.copytree(rayinfer_bert, tmp_path / "other-model")
    with pytest.raises(SpecError, match=r"cannot retry the errors of .* with another job: model was '.*bert-mlm', now '.*other-model'"):
        plan_retry(str(tmp_path / "out"), [f"model={tmp_path / 'other-model'}"])
    assert (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize("fmt, bad, broken", [
    pytest.param("jsonl", 7, '{"id": "r7", "text": "broken', id="jsonl-line-8-cut-off"),
    pytest.param("csv", 41, 'r41,"one field too many",extra', id="csv-r41-extra-field", marks=pytest.mark.slow),
])
def test_retry_errors_after_fixing_a_malformed_record_gives_every_row_once(tmp_path, rayinfer_bert_classifier,
                                                                          ray_session, fmt, bad, broken):
    """The user's path: a 100-row text file with one malformed record; run (99 results, one
    malformed error row); fix the record in place; retry-errors. Then 100 rows, 100 ids, the
    fixed row present, no errors, every row equal to the task run directly on the fixed file's
    rows (what a clean run gives: test_formats and test_e2e hold jobs to it)."""
    from helpers import write_as

    from rayinfer.api import retry_errors, run_job
    from rayinfer.testing import english_sentences

    sentences = english_sentences()
    table = pa.table({"id": [f"r{i}" for i in range(100)], "text": [sentences[i % len(sentences)] for i in range(100)]})
    path = write_as(fmt, table, tmp_path / "in", chunk_rows=100)
    good = path.read_text().splitlines(keepends=True)
    broken_lines = list(good)
    broken_lines[bad + (1 if fmt == "csv" else 0)] = broken + "\n"
    path.write_text("".join(broken_lines))

    def job(out: str) -> dict:
        return {"task": "classify", "model": str(rayinfer_bert_classifier), "input": {"path": str(path)},
                "output": {"path": str(tmp_path / out)}, "runtime": {"num_cpus": 1, "actors": 1}}

    first = run_job(job("out"))
    assert first["rows"] == 100 and first["errors"] == 1 and first["errors_this_run_by_kind"] == {"malformed": 1}
    [error_row] = [r for r in pq.read_table(tmp_path / "out").to_pylist() if r["error"]]
    assert error_row["id"] == f"r{bad}"  # the malformed record keeps its id (recovered before the fault)
    path.write_text("".join(good))
    manifest = retry_errors(tmp_path / "out")
    assert manifest["retries"][0]["rows_retried"] == 1 and manifest["retries"][0]["rows_fixed"] == 1
    assert manifest["rows"] == 100 and manifest["errors"] == 0
    from rayinfer_tasks.classify import ClassifyTask

    from rayinfer.testing import run_task

    got = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    ids = table.column("id").to_pylist()
    clean = dict(zip(ids, run_task(ClassifyTask, [{"text": t} for t in table.column("text").to_pylist()],
                                   rayinfer_bert_classifier)))
    assert len(pq.read_table(tmp_path / "out")) == 100 and sorted(got) == sorted(ids)
    assert f"r{bad}" in got and all(r["error"] is None for r in got.values())
    for i, row in got.items():
        assert row["label"] == clean[i]["label"] and abs(row["score"] - clean[i]["score"]) < 1e-5, i
