"""Property-based tests (hypothesis) of the spec loader and of the output commit/resume logic."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import FORMAT_CASES, write_as, write_units
from hypothesis import given, settings
from hypothesis import strategies as st

from rayinfer.errors import SpecError
from rayinfer.io.folder import committed_coverage, prepare, verify_coverage
from rayinfer.io.parts import part_coverage
from rayinfer.io.scan import scan
from rayinfer.io.store import list_parts
from rayinfer.spec import load_spec


@contextmanager
def text_chunks(rows: int) -> Iterator[None]:
    """JSON Lines and CSV blocks of ``rows`` records (hypothesis and monkeypatch do not mix)."""
    from rayinfer.io.formats import text as formats

    before, formats.TEXT_CHUNK_ROWS = formats.TEXT_CHUNK_ROWS, rows
    try:
        yield
    finally:
        formats.TEXT_CHUNK_ROWS = before

BASE = {
    "task": "fill-mask",
    "model": "some/model",
    "input": {"path": "in", "id_column": "id"},
    "output": {"path": "out"},
}

runtime_values = st.fixed_dictionaries(
    {},
    optional={
        "batch_size": st.integers(1, 10_000),
        "max_batch_tokens": st.integers(1, 1_000_000),
        "num_cpus": st.floats(0.25, 64, allow_nan=False),
        "num_gpus": st.sampled_from([0, 0.5, 1, 2]),
        "actors": st.one_of(st.none(), st.integers(1, 64)),
        "dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
        "max_error_rate": st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
        "actor_start_timeout_s": st.integers(1, 86_400),
    },
)


@settings(max_examples=150, deadline=None)
@given(runtime=runtime_values, mode=st.sampled_from(["error", "overwrite", "resume"]))
def test_valid_specs_load_the_same_from_a_dict_from_yaml_and_from_overrides(runtime, mode):
    data = {**BASE, "output": {"path": "out", "mode": mode}, "runtime": runtime}
    spec = load_spec(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(data))
        assert load_spec(path) == spec
    assert load_spec(spec.to_dict()) == spec  # round trip
    overrides = [f"runtime.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in runtime.items()]
    assert load_spec({**BASE, "output": {"path": "out", "mode": mode}}, overrides + [f"output.mode={mode}"]) == spec


@settings(max_examples=150, deadline=None)
@given(
    section=st.sampled_from(["", "input.", "output.", "runtime."]),
    key=st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=12),
)
def test_unknown_keys_are_spec_errors_never_crashes(section, key):
    known = {"": set(BASE) | {"tokenizer", "adapter", "merge_adapter", "trust_remote_code", "options", "runtime"},
             "input.": {"path", "id_column", "duplicate_ids", "columns", "keep", "on_unreadable", "format", "column_types",
                        "delimiter"},
             "output.": {"path", "mode", "part_rows", "part_bytes"},
             "runtime.": {"batch_size", "max_batch_tokens", "actors", "num_cpus", "num_gpus", "resources", "dtype",
                          "device", "max_error_rate", "actor_start_timeout_s"}}
    if key in known[section]:
        return
    with pytest.raises(SpecError, match=rf"unknown key '{section}{key}'"):
        load_spec(BASE, [f"{section}{key}=1"])


@settings(max_examples=40, deadline=None)
@given(
    rows_per_file=st.lists(st.integers(0, 60), min_size=1, max_size=4),
    row_group=st.integers(1, 25),
    batch=st.integers(1, 40),
    unit_rows=st.integers(1, 70),
    crash_after=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    as_uri=st.booleans(),
    retry=st.booleans(),
    fmt=st.sampled_from([f for f in FORMAT_CASES if f != "hf-dataset"]),
)
def test_commit_then_crash_then_resume_covers_every_row_exactly_once(
    rows_per_file, row_group, batch, unit_rows, crash_after, seed, as_uri, retry, fmt
):
    """Run the real read -> write -> commit path with random units and batching, stop after a
    random number of committed parts (leaving a half-written temp file, as a crash does), then
    either resume (new run: other units, other batching) or retry every unit as Ray retries a
    dead actor's unit (same run, no resume), and check: every input row is in exactly one part,
    no committed part was rewritten. The inputs are of every format, in chunks of ``row_group``
    rows (row groups, record batches, blocks of lines)."""
    with tempfile.TemporaryDirectory() as tmp, text_chunks(row_group):
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        next_id = 0
        for i, n in enumerate(rows_per_file):
            ids = list(range(next_id, next_id + n))
            next_id += n
            write_as(fmt, pa.table({"id": pa.array(ids, pa.int64())}), tmp / "in", row_group, name=f"f{i}")
        # a plain path, or the same folder as a file:// URI (the pyarrow FileSystem path object stores take)
        files, _ = scan(f"file://{tmp}/in" if as_uri else str(tmp / "in"))
        out = tmp / "out"
        location = f"file://{out}" if as_uri else str(out)

        def parts():
            return [out / name for name in list_parts(location)]

        total = sum(rows_per_file)
        n_batches = -(-total // batch) if total else 0
        prepare(location, "error")
        write_units(location, files, {}, batch, unit_rows, stop_after=int(crash_after * n_batches), shuffle_seed=seed)
        before = {p.name: p.stat().st_mtime_ns for p in parts()}

        if retry:  # the same units again, as Ray retries them: each skips what it had committed
            write_units(location, files, {}, batch, unit_rows, shuffle_seed=seed + 1)
        else:
            prepare(location, "resume")
            coverage, resumed_rows = committed_coverage(location)
            assert resumed_rows == sum(pq.read_metadata(p).num_rows for p in parts())
            write_units(location, files, coverage, max(1, batch // 2 + 1), max(1, unit_rows // 2), shuffle_seed=seed)
            assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())

        ids = []
        for p in parts():
            ids += pq.read_table(p).column("id").to_pylist()
        assert sorted(ids) == list(range(total))
        assert {p.name: p.stat().st_mtime_ns for p in parts() if p.name in before} == before
        verify_coverage(location, files)
        # each part's recorded coverage is exactly the rows it holds
        for p in parts():
            assert sum(b - a for rs in part_coverage(location, p.name).values() for a, b in rs) == pq.read_metadata(p).num_rows


BROKEN = {
    "jsonl": [lambda i: f'{{"id": "r{i}", "text": "cut off', lambda i: f'["r{i}"]',
              lambda i: f'{{"id": "r{i}", "text": {i}}}'],
    "csv": [lambda i: f'r{i},"one field too many",extra', lambda i: f"r{i}"],
}


@pytest.fixture(scope="module")
def loaded_classifier(rayinfer_bert_classifier):
    """The classify task on the tiny BERT classifier, loaded once for every example."""
    from rayinfer_tasks.classify import ClassifyTask

    from rayinfer.models.load import LoadContext
    from rayinfer.task.registry import load_registry

    task = ClassifyTask(ClassifyTask.Options(), LoadContext(model=str(rayinfer_bert_classifier)))
    task.load()
    return task, load_registry()


def _run_units(task, registry, job: dict, out: Path, units_of) -> None:
    """The actors' unit loop (rayinfer.run.unit), without Ray, over the units ``units_of(plan)``."""
    from rayinfer.plan.job import plan_job
    from rayinfer.run.cluster import actor_args
    from rayinfer.run.unit import UnitLoop
    from rayinfer.task.runner import TaskRunner

    plan = plan_job(job, registry=registry)
    prepare(str(out), plan.spec.output.mode)
    args = actor_args(plan, str(out), f"run-{out.name}")
    loop = UnitLoop(TaskRunner(task, **args["runner"]), args["settings"])
    for unit in units_of(plan):
        for _ in loop.run_unit(unit):
            pass


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(["jsonl", "csv"]),
    n=st.integers(3, 60),
    data=st.data(),
    chunk=st.integers(1, 25),
    batch=st.integers(1, 16),
    unit_rows=st.integers(1, 70),
    files=st.integers(1, 3),
)
def test_malformed_rows_fixed_then_retried_give_the_output_of_a_clean_run_row_for_row(
    loaded_classifier, rayinfer_bert_classifier, fmt, n, data, chunk, batch, unit_rows, files
):
    """Random malformed records in random places of one to three JSON Lines or CSV files (small
    files are packed into units and parts together): run, fix the files in place, retry-errors;
    the output equals a clean run of the fixed files row for row (ids, order within each part,
    labels; scores within float noise), and no row is lost or doubled."""
    from rayinfer.io.store import Store
    from rayinfer.plan.retry import error_units
    from rayinfer.plan.work import make_units
    from rayinfer.testing import english_sentences

    task, registry = loaded_classifier
    bad = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=max(1, n // 3)), label="bad rows"))
    how = [data.draw(st.sampled_from(BROKEN[fmt]), label=f"row {i}") for i in bad]
    sentences = english_sentences()
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": [sentences[i % len(sentences)] for i in range(n)]})
    with tempfile.TemporaryDirectory() as tmp, text_chunks(chunk):
        tmp = Path(tmp)
        per = -(-n // files)
        paths = [write_as(fmt, table.slice(k * per, per), tmp / "in", chunk, name=f"f{k}") for k in range(files)]
        good = [p.read_text().splitlines(keepends=True) for p in paths]
        header = 1 if fmt == "csv" else 0
        broken = [list(g) for g in good]
        for i, make in zip(bad, how):
            broken[i // per][header + i % per] = make(i) + "\n"
        for p, lines in zip(paths, broken):
            p.write_text("".join(lines))

        def job(out: str, mode: str = "error") -> dict:
            return {"task": "classify", "model": str(rayinfer_bert_classifier),
                    "input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / out), "mode": mode},
                    "runtime": {"batch_size": batch}}

        _run_units(task, registry, job("out"), tmp / "out", lambda plan: make_units(plan.files, {}, unit_rows))
        first = pq.read_table(tmp / "out")
        assert first.num_rows == n and first.column("error").null_count == n - len(bad)

        for p, lines in zip(paths, good):  # fixed in place: same rows, same places
            p.write_text("".join(lines))
        retried = []
        _run_units(task, registry, job("out", "resume"), tmp / "out",
                   lambda plan: retried.extend(error_units(Store(str(tmp / "out")), plan)[0]) or retried)
        assert sum(u["todo"] for u in retried) == len(bad)
        _run_units(task, registry, job("clean"), tmp / "clean", lambda plan: make_units(plan.files, {}, unit_rows))

        def rows(out: str) -> list[dict]:
            return [r for p in list_parts(str(tmp / out)) for r in pq.read_table(tmp / out / p).to_pylist()]

        got, clean = rows("out"), rows("clean")
        assert [r["id"] for r in got] == [r["id"] for r in clean] and len({r["id"] for r in got}) == n
        assert [(r["label"], r["error"]) for r in got] == [(r["label"], r["error"]) for r in clean]
        assert all(r["error"] is None for r in got)
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, clean)) < 1e-5
