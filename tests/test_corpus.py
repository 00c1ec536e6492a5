"""Large corpora: parts sized for readers, every actor of a pool working, resume that refuses to
mix two jobs' rows, and an actor whose memory does not grow with the rows it has done."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import fill_mask_job, masked_corpus, write_job

from rayinfer.api import run_job
from rayinfer.cli import main
from rayinfer.io.parts import footer_coverage
from rayinfer.io.store import MANIFEST, list_parts
from rayinfer.testing import build_bert


def parts_of(out: Path) -> list[pq.FileMetaData]:
    return [pq.read_metadata(out / name) for name in list_parts(str(out))]


@pytest.mark.slow
def test_a_pool_of_four_actors_all_commit_rows(tmp_path, rayinfer_bert, ray_session):
    """120 rows, batch_size 10, 4 actors (0.5 CPU each on the 2-CPU embedded Ray): work is cut
    so that every actor gets some, whatever order the actors come up in."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=120, files=1, runtime={"batch_size": 10, "actors": 4, "num_cpus": 0.5})
    seen: list[dict] = []
    manifest = run_job(job, progress=seen.append)
    assert len(manifest["actors"]) == 4 and all(rows > 0 for rows in manifest["actors"].values()), manifest["actors"]
    assert sum(manifest["actors"].values()) == 120
    # the embedded Ray has no GPU: num_gpus unset is 0, and every actor says it computed on the CPU in fp32
    assert manifest["spec"]["runtime"]["num_gpus"] is None and set(manifest["actor_gpu_ids"]) == set(manifest["actors"])
    assert list(manifest["actor_devices"].values()) == [{"device": "cpu", "dtype": "float32"}] * 4, manifest["actor_devices"]
    # the progress channel: first the actors loading the model (four of them, on 2 CPUs: seconds),
    # then rows done, only growing, up to all 120 rows, with every actor seen
    loading = [s["loading"] for s in seen if s.get("loading")]
    assert loading and seen[0].get("loading") and all(not s.get("loading") for s in seen[len(loading):]), seen[:8]
    assert all(load["actors"] == 4 and 0 <= load["ready"] < 4 for load in loading), loading
    assert [load["for_s"] for load in loading] == sorted(load["for_s"] for load in loading)
    assert [s["rows"] for s in seen] == sorted(s["rows"] for s in seen) and seen[-1]["rows"] == seen[-1]["todo"] == 120
    assert seen[-1]["actors"] == 4 and seen[-1]["parts"] == len(manifest["parts"]) and seen[-1]["eta_s"] == 0
    ids = pq.read_table(tmp_path / "out").column("doc_id").to_pylist()
    assert sorted(ids) == list(range(1000, 1120))


@pytest.mark.slow
def test_parts_hold_part_rows_or_part_bytes_except_each_units_tail(tmp_path, rayinfer_bert, ray_session):
    """A part is many actor batches: part_rows rows (or about part_bytes) except where its unit
    (a run of one file's rows) ends; its row groups are not one per batch."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=460, files=2, row_group_size=10,
                        runtime={"batch_size": 16, "actors": 1}, output={"part_rows": 50})
    manifest = run_job(job)
    out = tmp_path / "out"
    footers = parts_of(out)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for md in footers:
        ((file, ranges),) = footer_coverage(md).items()  # a part holds rows of one input file
        assert len(ranges) == 1 and ranges[0][1] - ranges[0][0] == md.num_rows
        assert md.num_row_groups == 1  # 4 batches of 16 rows went into one row group
        by_file.setdefault(file, []).append(ranges[0])
    # 230 rows per file in units of 50: four full parts and a tail of 30, per file
    assert sorted(sorted(b - a for a, b in ranges) for ranges in by_file.values()) == [[30, 50, 50, 50, 50]] * 2
    assert manifest["part_rows"] == {"min": 30, "max": 50} and len(manifest["parts"]) == 10

    # by bytes: each part closes once it holds part_bytes (row groups are written as it fills)
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=460, files=2, row_group_size=10,
                        runtime={"batch_size": 16, "actors": 1}, output={"part_bytes": 6000, "mode": "overwrite"})
    manifest = run_job(job)
    sizes: dict[str, list[tuple[int, int]]] = {}
    for name in list_parts(str(out)):
        md = pq.read_metadata(out / name)
        ((file, ranges),) = footer_coverage(md).items()
        sizes.setdefault(file, []).append((ranges[0][0], (out / name).stat().st_size))
    for file, parts in sizes.items():
        parts.sort()
        assert len(parts) > 2, parts
        assert all(size >= 6000 for _, size in parts[:-1]), parts  # all but the unit's tail are full
    assert sorted(pq.read_table(out).column("doc_id").to_pylist()) == list(range(1000, 1460))


@pytest.mark.slow
def test_many_small_files_make_parts_of_the_usual_size(tmp_path, rayinfer_bert_classifier, ray_session):
    """600 Parquet files of 100 rows (a crawl's shards): units span files, so two actors make 8
    parts (4 units each), not 600; every id exactly once, each part's footer naming its files'
    rows one file after the other."""
    from rayinfer.testing import english_sentences

    sentences = english_sentences()
    folder = tmp_path / "crawl"
    folder.mkdir()
    for f in range(600):
        ids = list(range(f * 100, f * 100 + 100))
        pq.write_table(pa.table({"id": ids, "text": [sentences[i % len(sentences)] for i in ids]}),
                       folder / f"shard-{f:05d}.parquet")
    job = write_job(tmp_path / "job.yaml", task="classify", model=str(rayinfer_bert_classifier),
                    input={"path": str(folder)}, output={"path": str(tmp_path / "out")},
                    runtime={"actors": 2, "num_cpus": 1})
    manifest = run_job(job)
    assert manifest["status"] == "complete" and manifest["rows"] == 60_000 and manifest["errors"] == 0
    footers = parts_of(tmp_path / "out")
    assert len(footers) <= 8 and sum(md.num_rows for md in footers) == 60_000
    ids = pq.read_table(tmp_path / "out", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 60_000 and sorted(ids) == list(range(60_000))
    for md in footers:  # a run of consecutive shards, every row of each
        coverage = footer_coverage(md)
        names = [Path(f).name for f in coverage]
        assert names == sorted(names) and all(r == [(0, 100)] for r in coverage.values())
        assert len(coverage) * 100 == md.num_rows


def _resume(job: Path, *overrides: str):
    result = CliRunner().invoke(main, ["run", str(job), "--resume", "--quiet", *[a for o in overrides for a in ("--set", o)]])
    assert "Traceback" not in result.output
    return result


@pytest.mark.slow
def test_resume_refuses_parts_another_job_wrote(tmp_path, rayinfer_bert, ray_session):
    """Another model, other options, or an input file rewritten since: refused with exit 2 before
    Ray starts, naming what differs, and nothing written. The same job resumes."""
    job = fill_mask_job(tmp_path, rayinfer_bert, rows=200, files=2, row_group_size=20, runtime={"batch_size": 20},
                        output={"part_rows": 40})
    run_job(job)
    out = tmp_path / "out"
    parts = sorted(out.glob("part-*.parquet"))
    for p in parts[len(parts) // 2:]:  # as if the run had been killed half-way
        p.unlink()
    (out / MANIFEST).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    other_model = build_bert(tmp_path / "other-bert", seed=1)
    result = _resume(job, f"model={other_model}")
    assert result.exit_code == 2
    assert "was written by another job (model: " in result.output and "model_fingerprint" in result.output

    result = _resume(job, "options.top_k=2")
    assert result.exit_code == 2
    assert 'options: {"max_length": null, "top_k": 3, "truncate": true} in the part, ' \
           '{"max_length": null, "top_k": 2, "truncate": true} now' in result.output

    ((covered_file, _),) = footer_coverage(pq.read_metadata(parts[0])).items()
    first = Path(covered_file)  # an input file that a kept part covers
    stat = first.stat()
    table = pq.read_table(first)
    time.sleep(0.01)
    pq.write_table(table, first, row_group_size=20)  # the same rows, rewritten: it may not be the same rows
    result = _resume(job)
    assert result.exit_code == 2
    assert f"input file '{first}' changed since part" in result.output and "output.mode: overwrite" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written

    assert first.stat().st_size == stat.st_size
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the cause removed: the file as it was
    result = _resume(job)  # the same job: resumes
    assert result.exit_code == 0, result.output
    ids = pq.read_table(out).column("doc_id").to_pylist()
    assert sorted(ids) == masked_corpus(200)["doc_id"]


@pytest.mark.slow
def test_an_actors_memory_does_not_grow_with_the_rows_it_has_done(tmp_path, ray_session):
    """80k short rows through one actor with the tiny classifier: the actor's RSS (reported by the
    actor itself, about once a second) after 60k rows stays within 25 MB of what it was at 5-25k
    rows. Over this span warm-up still adds ~10 MB, so this catches leaks of a few hundred bytes a
    row and more; `python -m benchmarks.memory` runs the 300k-row check that tells ~150 bytes a row
    (what an earlier design leaked) from warm-up."""
    from rayinfer.testing import english_sentences, write_dataset

    model = build_bert(tmp_path / "model", head="sequence-classification")
    sents = english_sentences()
    n = 80_000
    write_dataset(tmp_path / "in", {"id": list(range(n)), "text": [sents[i % len(sents)] for i in range(n)]}, files=3)
    spec = {"task": "classify", "model": str(model), "input": {"path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / "out")}, "runtime": {"actors": 1, "num_cpus": 2}}
    samples: list[tuple[int, float]] = []
    manifest = run_job(spec, progress=lambda s: samples.append((s["rows"], max(s["actor_rss_mb"].values(), default=0.0))))
    assert manifest["rows"] == n and manifest["errors"] == 0

    def median(values: list[float]) -> float:
        assert len(values) >= 3, samples
        return sorted(values)[len(values) // 2]

    early = median([rss for rows, rss in samples if 5_000 <= rows <= 25_000])
    late = median([rss for rows, rss in samples if rows >= 60_000])
    assert late - early < 25, f"actor RSS grew from {early:.0f} MB to {late:.0f} MB: {samples}"


def test_while_the_actors_load_the_progress_line_says_so_and_the_rows_line_follows_at_once():
    import io

    from rayinfer.run.progress import TerminalProgress

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    snap = {"rows": 0, "todo": 16, "committed_rows": 0, "parts": 0, "errors": 0, "elapsed_s": 1.0,
            "rows_per_s": 0.0, "tokens_per_s": 0.0, "eta_s": None, "actors": 0, "actor_rss_mb": {}}
    progress({**snap, "loading": {"actors": 2, "ready": 0, "for_s": 1.2}})
    progress({**snap, "loading": {"actors": 2, "ready": 1, "for_s": 2.3}})  # within LOG_EVERY_S: not printed
    progress({**snap, "rows": 8, "rows_per_s": 2.0, "eta_s": 4.0, "actors": 1})  # the first rows line: at once
    assert stream.getvalue().splitlines() == [
        "rayinfer: 2 of 2 actors loading the model, 0:01; 16 rows to do",
        "rayinfer: 8/16 rows (50%), 2.0 rows/s, 0 tokens/s, 0 errors, 0 parts committed, 1 actors, ETA 0:04",
    ]


def test_progress_is_one_line_every_few_seconds_when_not_on_a_terminal():
    import io

    from rayinfer.run.progress import TerminalProgress

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    snap = {"rows": 500, "todo": 2000, "committed_rows": 0, "parts": 1, "errors": 3, "elapsed_s": 10.0,
            "rows_per_s": 50.0, "tokens_per_s": 1234.0, "eta_s": 30.0, "actors": 2, "actor_rss_mb": {}}
    progress(snap)
    progress({**snap, "rows": 600})  # within LOG_EVERY_S of the last line: not printed
    progress({**snap, "rows": 2000, "eta_s": 0.0})  # the end always is, once
    progress({**snap, "rows": 2000, "eta_s": 0.0, "parts": 2})
    assert stream.getvalue().splitlines() == [
        "rayinfer: 500/2000 rows (25%), 50.0 rows/s, 1234 tokens/s, 3 errors, 1 parts committed, 2 actors, ETA 0:30",
        "rayinfer: 2000/2000 rows (100%), 50.0 rows/s, 1234 tokens/s, 3 errors, 1 parts committed, 2 actors, ETA 0:00",
    ]


@pytest.mark.parametrize("prefetch", [pytest.param(False, id="in-turn"), pytest.param(True, id="prefetch-thread")])
def test_an_actor_gives_the_same_parts_with_or_without_its_prefetch_thread(tmp_path, rayinfer_bert, ray_session, prefetch):
    """GPU actors read and tokenize on a second thread, CPU actors in turn: the same outputs,
    and a row group that cannot be read fails the unit (nothing committed from it) either way."""
    import pyarrow as pa
    from rayinfer_tasks.fill_mask import FillMaskTask
    from test_faults import damage_row_group

    from rayinfer.api import plan_job
    from rayinfer.errors import UnreadableInput
    from rayinfer.io.folder import prepare
    from rayinfer.io.store import Store
    from rayinfer.plan.work import make_units
    from rayinfer.run.actor import TaskActor
    from rayinfer.run.cluster import actor_args
    from rayinfer.run.progress import WorkReport
    from rayinfer.testing import run_task

    job = fill_mask_job(tmp_path, rayinfer_bert, rows=100, files=2, row_group_size=10, runtime={"batch_size": 8})
    plan = plan_job(job)
    out = str(tmp_path / "out")
    prepare(out, "error")
    args = actor_args(plan, out, "run-1")
    actor = TaskActor(**{**args, "settings": dataclasses.replace(args["settings"], prefetch=prefetch)})
    units = make_units(plan.files, {}, 30)
    reports = [r for u in units for t in actor(pa.Table.from_pylist([u])) for r in WorkReport.from_table(t)]
    assert sum(r.rows for r in reports) == 100 and sorted(p for r in reports for p in r.parts) == list_parts(out)
    rows = {r["doc_id"]: r for r in pq.read_table(out).to_pylist()}
    corpus = masked_corpus(100)
    direct = run_task(FillMaskTask, [{"text": t} for t in corpus["sentence"]], rayinfer_bert, {"top_k": 3})
    assert [rows[i]["filled"] for i in corpus["doc_id"]] == [d["filled"] for d in direct]

    damage_row_group(sorted((tmp_path / "in").glob("*.parquet"))[0], 1, "sentence")
    Store(out).fs.delete_dir_contents(Store(out).root)
    with pytest.raises(UnreadableInput, match=r"row group 1 \(rows 10-19\) cannot be read"):
        for _ in actor(pa.Table.from_pylist([units[0]])):
            pass
    assert list_parts(out) == [] and not any((tmp_path / "out" / ".tmp").iterdir())
