"""The same job from every input format as users have them: Parquet, Arrow IPC (file and
stream), a Hugging Face save_to_disk folder, JSON Lines and CSV give identical outputs; string
columns of every Arrow string type work; malformed records are error rows naming file and line;
the output folder reads back as one table in pyarrow, DuckDB, pandas and Hugging Face datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import FORMAT_CASES, write_as, write_job
from rayinfer_tasks.classify import ClassifyTask

from rayinfer.api import plan_job, run_job
from rayinfer.cli import main
from rayinfer.errors import InputError
from rayinfer.io.formats import text as formats
from rayinfer.io.rows import read_rows
from rayinfer.io.scan import scan
from rayinfer.plan.work import make_units
from rayinfer.testing import english_sentences, run_task

# real sentences, and a few that CSV must quote: commas, quotes, a line break inside a value
TEXTS = [s for s in english_sentences()[800:900] if len(s) < 120][:45] + [
    'She said "yes", then left.', "one, two, three", "a value\nover two lines", "  leading spaces"]
TABLE = pa.table({"uid": [f"r{i:03d}" for i in range(len(TEXTS))], "text": TEXTS})


@pytest.fixture(scope="module")
def expected(rayinfer_bert_classifier):
    """The task run without Ray on the same rows: what every format's job must give."""
    rows = run_task(ClassifyTask, [{"text": t} for t in TEXTS], rayinfer_bert_classifier)
    return {uid: (r["label"], r["score"]) for uid, r in zip(TABLE.column("uid").to_pylist(), rows)}


@pytest.fixture
def small_text_chunks(monkeypatch):
    """Blocks of 16 records, so that JSON Lines and CSV inputs have several chunks."""
    monkeypatch.setattr(formats, "TEXT_CHUNK_ROWS", 16)


def classify_job(tmp_path, model, input_path, **input_spec):
    return write_job(
        tmp_path / "job.yaml", task="classify", model=str(model),
        input={"path": str(input_path), "id_column": "uid", **input_spec},
        output={"path": str(tmp_path / "out")}, runtime={"batch_size": 8, "num_cpus": 1, "actors": 1},
    )


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_every_format_reads_the_same_rows_in_every_unit(fmt, tmp_path, rayinfer_bert_classifier, small_text_chunks):
    """The planned job's units, read as an actor reads them (the one reader, in batches of 5),
    give every row of the table once, with its id and text as written: what the task sees is the
    same whatever the format (the job below runs one of them end to end)."""
    path = write_as(fmt, TABLE, tmp_path / "in", chunk_rows=16)
    given = {"format": "jsonl"} if fmt == "c4-json.gz" else {}  # C4's .json files are JSON Lines; .jsonl.zst: auto
    plan = plan_job(classify_job(tmp_path, rayinfer_bert_classifier, path, **given))
    by_path = {f.path: f for f in plan.files}
    units = make_units(plan.files, {}, 7)
    assert len(units) > 1
    rows = [r for u in units for piece in u["pieces"]
            for t, _, problem in read_rows(by_path[piece["file"]], piece["ranges"], ["uid", "text"], 5)
            for r in t.to_pylist() if problem is None]
    assert sorted(rows, key=lambda r: r["uid"]) == TABLE.to_pylist()


def test_a_job_from_gzipped_json_lines_files_gives_the_tasks_outputs(tmp_path, rayinfer_bert_classifier, expected,
                                                                      ray_session, small_text_chunks):
    """Two compressed JSON Lines files named as C4 ships them, end to end: every row's label and
    score equal the task run on it without Ray."""
    path = write_as("c4-json.gz", TABLE, tmp_path / "in", chunk_rows=16)
    manifest = run_job(classify_job(tmp_path, rayinfer_bert_classifier, path, format="jsonl"))
    assert manifest["status"] == "complete" and manifest["rows"] == len(TEXTS) and manifest["errors"] == 0
    assert manifest["input"]["files"] == 2
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["uid"] for r in out) == sorted(expected)
    for r in out:
        label, score = expected[r["uid"]]
        assert r["label"] == label and r["score"] == pytest.approx(score, abs=1e-6), r["uid"]


@dataclass(frozen=True)
class StringType:
    fmt: str
    text: pa.DataType


@pytest.mark.parametrize("case", [
    pytest.param(StringType("parquet", pa.large_string()), id="large_string"),
    pytest.param(StringType("arrow-file", pa.dictionary(pa.int32(), pa.string())), id="dictionary"),
    pytest.param(StringType("arrow-stream", pa.string_view()), id="string_view"),
])
def test_string_columns_of_every_arrow_string_type_are_text(case, tmp_path, rayinfer_bert_classifier, expected):
    table = TABLE.set_column(1, "text", pc.cast(TABLE.column("text"), case.text))
    path = write_as(case.fmt, table, tmp_path / "in", chunk_rows=16)
    plan = plan_job(classify_job(tmp_path, rayinfer_bert_classifier, path))
    assert plan.input_schema.field("text").type == case.text
    [file] = plan.files
    rows = [r for t, _, _ in read_rows(file, make_units(plan.files)[0]["pieces"][0]["ranges"], ["uid", "text"]) for r in t.to_pylist()]
    assert [r["text"] for r in rows] == TEXTS and all(isinstance(r["text"], str) for r in rows)


def test_a_malformed_json_line_is_an_error_row_naming_file_and_line(tmp_path, rayinfer_bert_classifier, ray_session,
                                                                  small_text_chunks):
    lines = [json.dumps(r) for r in TABLE.to_pylist()]
    lines[20] = '{"uid": "r020", "text": "cut off'  # not JSON
    lines[33] = '{"uid": "r033", "text": 33}'  # JSON, but the text is a number
    lines[40] = json.dumps({"uid": None, "text": TEXTS[40]})  # a row without its id: never a silent result
    lines.insert(10, "")  # a blank line is no row
    path = tmp_path / "in" / "data.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    manifest = run_job(classify_job(tmp_path, rayinfer_bert_classifier, path))
    assert manifest["rows"] == len(TEXTS) and manifest["errors"] == 3
    assert manifest["errors_this_run_by_kind"] == {"malformed": 2, "null_id": 1}
    out = pq.read_table(tmp_path / "out").to_pylist()
    bad = sorted((r["error"] for r in out if r["error"]))
    assert bad[0].startswith(f"input file {str(path)!r}, line 22: not valid JSON (Unterminated string")
    assert bad[1].startswith(f"input file {str(path)!r}, line 35: JSON parse error: Column(/text) changed from string")
    assert bad[2].startswith(f"input file {str(path)!r}, line 42: its id (column 'uid') is null; every row needs an id")
    assert [r["label"] for r in out if r["uid"] is None] == [None]
    good = [r for r in out if r["error"] is None]
    assert sorted(r["uid"] for r in good) == sorted(u for u in TABLE.column("uid").to_pylist()
                                                    if u not in ("r020", "r033", "r040"))


def test_a_csv_record_with_missing_fields_is_an_error_row_and_the_block_goes_on(tmp_path, small_text_chunks):
    path = write_as("csv", TABLE, tmp_path / "in", chunk_rows=16)
    text = path.read_text().splitlines(keepends=True)
    text[5] = '"r004"\n'  # line 6: one field of two
    path.write_text("".join(text))
    files, _ = scan(str(path))
    got = [b for u in make_units(files, unit_rows=100) for p in u["pieces"]
           for b in read_rows(files[0], p["ranges"], ["uid", "text"], 100)]
    errors = [(rows.to_pylist(), e) for t, rows, e in got if e is not None]
    assert len(errors) == 1 and errors[0][0] == [4]
    assert errors[0][1].kind == "malformed" and "line 6: CSV parse error: Expected 2 columns, got 1" in errors[0][1].message
    rows = [r for t, _, e in got if e is None for r in t.to_pylist()]
    assert len(rows) == len(TEXTS) - 1 and rows[-2]["text"] == "a value\nover two lines"


@pytest.mark.parametrize("fmt, cut", [pytest.param("jsonl", 16, id="jsonl"), pytest.param("csv", 16, id="csv")])
def test_text_inputs_are_indexed_in_blocks_that_are_read_alone(fmt, cut, tmp_path, small_text_chunks):
    path = write_as(fmt, TABLE, tmp_path / "in", chunk_rows=cut)
    [file], schema = scan(str(path))
    assert file.chunk_rows == (16, 16, 16, 1) and schema.names == ["uid", "text"]
    # a unit of the third block alone reads only that block's bytes and gives its rows
    rows = [r for t, _, _ in read_rows(file, [(32, 48)], ["uid"]) for r in t.to_pylist()]
    assert [r["uid"] for r in rows] == [f"r{i:03d}" for i in range(32, 48)]


def test_a_folder_whose_schema_drifts_runs_as_one_dataset(tmp_path, rayinfer_bert_classifier, expected, ray_session):
    """What pandas and Polars write: the second file's text is large_string, it has a column the
    first lacks. The glob beside its output (data/in-*.parquet -> data/predictions) cannot match
    the parts, so it is no overlap."""
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(TABLE.slice(0, 20), data / "in-a.parquet", row_group_size=8)
    b = TABLE.slice(20)
    b = pa.table({"uid": b.column("uid"), "text": pc.cast(b.column("text"), pa.large_string()),
                  "source": pa.array(range(b.num_rows), pa.int32())})
    pq.write_table(b, data / "in-b.parquet")
    job = write_job(tmp_path / "job.yaml", task="classify", model=str(rayinfer_bert_classifier),
                    input={"path": str(data / "in-*.parquet"), "id_column": "uid", "keep": ["source"]},
                    output={"path": str(data / "predictions")}, runtime={"batch_size": 8, "num_cpus": 1, "actors": 1})
    plan = plan_job(job)
    assert plan.input_schema.field("text").type == pa.large_string()
    manifest = run_job(job)
    assert manifest["status"] == "complete" and manifest["rows"] == len(TEXTS) and manifest["errors"] == 0
    out = pq.read_table(data / "predictions").to_pylist()
    assert sorted(r["uid"] for r in out) == sorted(expected)
    for r in out:
        assert (r["label"], r["score"]) == (expected[r["uid"]][0], pytest.approx(expected[r["uid"]][1], abs=1e-6))
        assert r["source"] == (None if r["uid"] < "r020" else int(r["uid"][1:]) - 20)


def test_schemas_unify_where_types_agree_and_a_conflict_names_both_files(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["a", "b"], "tags": [["x"], ["y"]]}),
                   tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([3], pa.int64()), "text": pa.array(["c"], pa.string_view()),
                             "tags": [["z"]]}), tmp_path / "in" / "b.parquet")
    files, schema = scan(str(tmp_path / "in"), required=("id", "text"))
    assert schema.types == [pa.int64(), pa.string(), pa.list_(pa.string())]
    got = [r for f in files for t, _, _ in read_rows(f, [(0, f.num_rows)], ["id", "text"]) for r in t.to_pylist()]
    assert got == [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 3, "text": "c"}]
    pq.write_table(pa.table({"id": [4], "text": ["d"], "tags": ["not a list"]}), tmp_path / "in" / "c.parquet")
    a, c = str(tmp_path / "in" / "a.parquet"), str(tmp_path / "in" / "c.parquet")
    with pytest.raises(InputError, match=f"column 'tags' is string in {c!r} but list<element: string> in {a!r}"):
        scan(str(tmp_path / "in"))
    (tmp_path / "in" / "c.parquet").unlink()
    pq.write_table(pa.table({"id": [4], "body": ["d"]}), tmp_path / "in" / "c.parquet")
    with pytest.raises(InputError, match=f"input file {c!r} lacks column 'text' that {a!r} has"):
        scan(str(tmp_path / "in"), required=("id", "text"))


def test_a_first_file_of_malformed_lines_types_nothing_and_a_number_in_text_is_one_bad_row(tmp_path):
    """Found by test_properties: the first JSON Lines file holds only a line cut off (it typed no
    column, and the planner refused the job for lacking the id column), or its first record has a
    number for its text (its one vote typed the text column int64, and the planner refused a
    string input). Now the next file types the columns, the text column the task reads is text,
    and those lines are malformed rows; every other row reads as written."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"uid": "r0", "text": "cut off\n')
    (tmp_path / "in" / "b.jsonl").write_text('{"uid": "r1", "text": 1}\n{"uid": "r2", "text": "two"}\n')
    (tmp_path / "in" / "c.jsonl").write_text('{"uid": "r3", "text": "three"}\n')
    files, schema = scan(str(tmp_path / "in"), required=("uid", "text"), text_columns=("text",))
    assert schema == pa.schema([("uid", pa.string()), ("text", pa.string())])
    assert [f.num_rows for f in files] == [1, 2, 1]
    got = [(r, e) for f in files for t, rows, e in read_rows(f, [(0, f.num_rows)], ["uid", "text"])
           for r in (t.to_pylist() if e is None else [None] * len(rows))]
    assert [r for r, _ in got] == [None, None, {"uid": "r2", "text": "two"}, {"uid": "r3", "text": "three"}]
    assert [e.kind for _, e in got[:2]] == ["malformed", "malformed"]
    assert "line 1: JSON parse error: Column(/text) changed from string to number" in got[1][1].message
    # without the task's text columns (a column no task reads), the types are the sample's
    assert scan(str(tmp_path / "in"))[1].field("text").type == pa.int64()
    (tmp_path / "in" / "b.jsonl").write_text("[1]\n")
    (tmp_path / "in" / "c.jsonl").write_text("")
    with pytest.raises(InputError, match="a.jsonl': none of its first lines is a JSON object, nor any other input file's"):
        scan(str(tmp_path / "in"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_files_whose_columns_drift_are_parsed_into_the_first_files_columns(fmt, tmp_path):
    """A later file without a column of the first: null there; one without a column the job
    reads: refused (CSV, from its header) or, in JSON Lines, whose records are not read before the
    run, a null the task reports per row."""
    first = TABLE.slice(0, 10).append_column("source", pa.array(["web"] * 10))
    write_as(fmt, first, tmp_path / "in", 16, name="a")
    write_as(fmt, TABLE.slice(10, 5), tmp_path / "in", 16, name="b")  # no source column
    files, schema = scan(str(tmp_path / "in"), required=("uid", "text"))
    assert schema.names == ["uid", "text", "source"]
    got = [r for f in files for t, _, _ in read_rows(f, [(0, f.num_rows)], ["uid", "source"]) for r in t.to_pylist()]
    assert [r["source"] for r in got] == ["web"] * 10 + [None] * 5
    if fmt == "csv":
        b = str(tmp_path / "in" / "b.csv")
        with pytest.raises(InputError, match=f"input file {b!r} lacks column 'source' that .*a.csv' has .and the job reads"):
            scan(str(tmp_path / "in"), required=("uid", "source"))


@pytest.mark.parametrize("fmt", ["parquet", "arrow-file", "arrow-stream"])
def test_a_binary_file_with_null_ids_is_refused_before_ray_starts(fmt, tmp_path, rayinfer_bert_classifier):
    table = TABLE.set_column(0, "uid", pa.array([None if i in (3, 17) else u for i, u in
                                                 enumerate(TABLE.column("uid").to_pylist())], pa.string()))
    path = write_as(fmt, table, tmp_path / "in", chunk_rows=16)
    result = CliRunner().invoke(main, ["run", str(classify_job(tmp_path, rayinfer_bert_classifier, path))])
    assert result.exit_code == 2, result.output
    assert (f"input file {str(path)!r} has 2 row(s) whose id (column 'uid') is null: every row needs an id"
            in result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("codec, ext", [("gzip", ".gz"), ("bz2", ".bz2"), ("zstd", ".zst"), ("xz", ".xz"), ("lz4", ".lz4")])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_compressed_text_inputs_read_as_streams_like_the_plain_file(fmt, codec, ext, tmp_path, small_text_chunks):
    """Each codec, read through pyarrow's streams (xz: Python's lzma): the same blocks and rows
    as the plain file, a block read alone, a unit that starts inside the file."""
    import lzma

    plain = write_as(fmt, TABLE, tmp_path / "plain", chunk_rows=16)
    packed = tmp_path / "in" / (plain.name + ext)
    packed.parent.mkdir()
    if codec == "xz":
        packed.write_bytes(lzma.compress(plain.read_bytes()))
    else:
        with pa.output_stream(str(packed), compression=codec) as f:
            f.write(plain.read_bytes())
    [want], want_schema = scan(str(plain))
    [got], schema = scan(str(packed))
    assert got.source.compression == codec and got.source.format == fmt and schema == want_schema
    assert got.chunk_rows == want.chunk_rows == (16, 16, 16, 1) and got.source.offsets == want.source.offsets
    whole = [r for t, _, _ in read_rows(got, [(0, got.num_rows)], ["uid", "text"], 7) for r in t.to_pylist()]
    assert whole == TABLE.to_pylist()
    inside = [r["uid"] for t, _, _ in read_rows(got, [(20, 23), (40, 49)], ["uid"]) for r in t.to_pylist()]
    assert inside == [f"r{i:03d}" for i in [20, 21, 22, *range(40, 49)]]


def test_json_files_are_json_lines_when_their_first_line_is_an_object(tmp_path):
    import gzip

    (tmp_path / "c4").mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in TABLE.to_pylist())
    (tmp_path / "c4" / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c4" / "plain.json").write_text(lines)
    files, schema = scan(str(tmp_path / "c4"))
    assert [f.source.format for f in files] == ["jsonl", "jsonl"] and schema.names == ["uid", "text"]
    assert [f.num_rows for f in files] == [len(TEXTS)] * 2
    (tmp_path / "doc.json").write_text(json.dumps(TABLE.to_pylist(), indent=1))
    with pytest.raises(InputError, match="is JSON but not JSON Lines .one object per line.: rayinfer reads JSON in chunks"):
        scan(str(tmp_path / "doc.json"))


def test_a_damaged_compressed_file_is_refused_when_planned_and_one_line_when_it_breaks_later(tmp_path):
    import gzip

    from rayinfer.errors import UnreadableInput

    path = tmp_path / "in.jsonl.gz"
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in TABLE.to_pylist()).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"in.jsonl.gz' cannot be read to its end \(.*\): is it damaged or cut off\?"):
        scan(str(path))
    path.write_bytes(data)
    [file], _ = scan(str(path))
    path.write_bytes(data[:100] + b"\xff" * 40 + data[140:])  # damaged after the job was planned
    with pytest.raises(UnreadableInput, match=r"in.jsonl.gz', the block of rows 0-48 from line 1 cannot be read"):
        list(read_rows(file, [(0, file.num_rows)], ["uid"]))
    for name, message in [("in.zip", "is a zip archive, not a stream of records: unzip it"),
                          ("in.parquet.gz", "is a parquet file compressed as a whole .gzip.: rayinfer reads parquet "
                                            "files by random access")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=message):
            scan(str(tmp_path / name), fmt="jsonl" if name.endswith(".zip") else "auto")


def test_a_hugging_face_dataset_dict_names_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="is a Hugging Face DatasetDict; point it at one split's folder"):
        scan(str(tmp_path / "dd"))
    [file], _ = scan(str(tmp_path / "dd" / "train"))
    assert file.num_rows == 1 and file.source.format == "arrow"


def test_a_folder_of_mixed_formats_is_refused(tmp_path):
    write_as("parquet", TABLE, tmp_path / "in", 16, name="a")
    write_as("jsonl", TABLE, tmp_path / "in", 16, name="b")
    with pytest.raises(InputError, match=r"holds files of several formats \(jsonl, parquet\)"):
        scan(str(tmp_path / "in"))


def test_csv_column_types_are_given_or_inferred(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,score,text\n1,0.5,a\n2,1.5,b\n")
    assert scan(str(path))[1].types == [pa.int64(), pa.float64(), pa.string()]
    assert scan(str(path), column_types={"id": "string"})[1].field("id").type == pa.string()
    with pytest.raises(InputError, match="input.column_types.id: 'integer' is not an Arrow type name"):
        scan(str(path), column_types={"id": "integer"})


def test_the_output_reads_as_one_table_in_pyarrow_duckdb_pandas_and_datasets(tmp_path, rayinfer_bert_classifier,
                                                                           ray_session):
    import datasets
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    path = write_as("parquet", TABLE, tmp_path / "in", chunk_rows=8)
    run_job(classify_job(tmp_path, rayinfer_bert_classifier, path), ["output.part_rows=10"])
    out = tmp_path / "out"
    assert len(list(out.glob("*.parquet"))) > 1
    ids = sorted(TABLE.column("uid").to_pylist())
    assert sorted(ds.dataset(out).to_table().column("uid").to_pylist()) == ids
    assert sorted(pd.read_parquet(out)["uid"]) == ids
    con = duckdb.connect()
    assert sorted(u for (u,) in con.execute(f"select uid from read_parquet('{out}/*.parquet')").fetchall()) == ids
    count, distinct = con.execute(f"select count(*), count(distinct uid) from '{out}/*.parquet'").fetchone()
    assert count == distinct == len(ids)
    loaded = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["uid"]) == ids
