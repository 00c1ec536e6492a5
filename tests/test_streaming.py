"""Rows stream across batches: a unit's batches go through one decode loop, the next batch's rows
joining as slots free (no drain to zero between batches), without Ray. Outputs are held to what
each batch gives alone (itself held to ``model.generate`` in test_generation.py)."""

from __future__ import annotations

import functools
import json
import zlib

import pyarrow as pa
import pytest
import torch
from rayinfer_tasks.generate import GenerateTask
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayinfer import decoding
from rayinfer.models.load import LoadContext
from rayinfer.task.device import DeviceFailure
from rayinfer.task.runner import BatchStats, TaskRunner, output_schema
from rayinfer.testing import english_sentences


SENTENCES = [s for s in english_sentences()[300:420] if 20 < len(s) < 140]


@pytest.fixture(scope="module")
def llama(rayinfer_llama):
    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    return AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval(), tok


def _ids(text):
    """A prompt's token ids from its words alone, the same in every session: the tiny tokenizer's
    vocabulary is not (its training breaks ties in Rust's per-process hash order), and ids from it
    would change the model's tokens, so the rows' ends and the schedule these tests check."""
    return [1] + [5 + zlib.crc32(w.encode()) % 995 for w in text.split()]


def _lists(tok, sizes, start=0):
    out, at = [], start
    for n in sizes:
        out.append([decoding.Row((len(out), k), _ids(s)) for k, s in enumerate(SENTENCES[at: at + n])])
        at += n
    return out


def _ends(new):
    """A row's own end, from its tokens alone: after (first token % 7) + 2 tokens (2..8)."""
    return len(new) >= new[0] % 7 + 2


def test_the_next_lists_rows_join_before_the_last_lists_rows_have_ended(llama):
    """3 lists of 6 rows, 4 slots, rows ending at their own steps: each list is taken while rows of
    the last one are still decoding (no drain), one KV cache serves all three, and every row's
    tokens equal ``decode`` on its list alone (and the first row ``model.generate``'s)."""
    model, tok = llama
    lists = _lists(tok, [6, 6, 6])
    returned: list[tuple[int, int]] = []
    taken_after: dict[int, int] = {}  # list -> rows of earlier lists not yet returned when it was taken

    def source():
        for n, rows in enumerate(lists):
            taken_after[n] = sum(len(lists[m]) for m in range(n)) - len(returned)
            yield rows

    stats = decoding.DecodeStats()
    with torch.inference_mode():
        for row in decoding.stream(model, source(), max_new_tokens=10, eos={tok.eos_token_id}, pad=0, slots=4,
                                   budget=4096, stopped=_ends, stats=stats):
            returned.append(row.key)
        alone = [decoding.decode(model, [r.prompt for r in rows], max_new_tokens=10, eos={tok.eos_token_id}, pad=0,
                                 slots=4, stopped=_ends) for rows in lists]
    assert sorted(returned) == sorted(r.key for rows in lists for r in rows)  # every row once
    assert taken_after[1] > 0 and taken_after[2] > 0  # rows of the earlier lists still in flight
    assert stats.loops == 1 and stats.lists == 3
    assert [[r.new for r in rows] for rows in lists] == alone
    first, ids = lists[0][0].new, torch.tensor([lists[0][0].prompt])
    with torch.inference_mode():
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert first == want[: len(first)] and _ends(first)


def test_seeded_rows_draw_the_same_tokens_streamed_or_alone(llama):
    model, tok = llama
    sampler = decoding.Sampler(True, 1.2, 40, 0.95, 1.1)
    lists = _lists(tok, [5, 5])
    for rows in lists:
        for r in rows:
            r.seed = 1000 + r.key[0] * 10 + r.key[1]
    with torch.inference_mode():
        for _ in decoding.stream(model, iter(lists), max_new_tokens=8, eos=set(), pad=0, slots=3, sampler=sampler):
            pass
        one = lists[1][3]
        alone = decoding.decode(model, [one.prompt], max_new_tokens=8, eos=set(), pad=0, slots=1, sampler=sampler,
                                seeds=[one.seed])
    assert alone == [one.new] and len(one.new) == 8


@pytest.mark.parametrize("budget", [None, 4 * 24], ids=["slots-grow", "over-the-budget"])
def test_a_later_longer_row_grows_the_slots_or_past_the_budget_starts_another_loop(llama, budget):
    """The loop's slots are sized for twice the first list's longest prompt: a later, longer row
    grows them where the budget allows (one loop), else waits for the loop to drain and starts a
    second one, with the rows after it. Every row's tokens equal ``decode`` alone either way."""
    model, tok = llama
    short = [decoding.Row(("a", k), _ids(s)[:6]) for k, s in enumerate(SENTENCES[:4])]
    long_ids = _ids(" ".join(SENTENCES[4:8]))
    assert len(long_ids) + 5 > 4 * 24 // 4
    late = [decoding.Row(("b", 0), long_ids), decoding.Row(("b", 1), _ids(SENTENCES[9])[:6])]
    stats = decoding.DecodeStats()
    with torch.inference_mode():
        out = {r.key: r.new for r in decoding.stream(model, iter([short, late]), max_new_tokens=5, eos=set(), pad=0,
                                                      slots=4, budget=budget, stats=stats)}
        want = decoding.decode(model, [r.prompt for r in short + late], max_new_tokens=5, eos=set(), pad=0, slots=1)
    assert stats.loops == (1 if budget is None else 2)
    assert [out[r.key] for r in short + late] == want


# -- the runner: batches in, output tables out, in order -----------------------------------------


def _generate_runner(model_dir, rows=4, **options):
    task = GenerateTask(GenerateTask.Options.model_validate({"max_new_tokens": 8, **options}), LoadContext(model=str(model_dir)))
    task.load()
    return TaskRunner(task, max_batch_tokens=4096, max_batch_rows=rows)


def _tables(n_batches, size):
    return [pa.table({"id": [f"r{b * size + k}" for k in range(size)], "prompt": SENTENCES[b * size: (b + 1) * size]})
            for b in range(n_batches)]


def _streamed(runner, tables, skip=()):
    schema = output_schema(GenerateTask, runner.task.options, tables[0].schema, "id", [])
    entries = ((b, None if b in skip else (t, runner.prepare_table(t))) for b, t in enumerate(tables))
    stats = BatchStats()
    out = list(runner.stream_tables(entries, schema, stats))
    return schema, out, stats


def test_stream_tables_equal_each_batch_run_alone_in_order(rayinfer_llama):
    runner = _generate_runner(rayinfer_llama)
    assert runner.streams
    tables = _tables(4, 5)
    schema, out, stats = _streamed(runner, tables, skip={2})
    assert [tag for tag, _ in out] == [0, 1, 2, 3]
    assert out[2][1] is None  # a batch with no rows for the model passes through, in its place
    for b in (0, 1, 3):
        alone = runner.complete_table(tables[b], runner.prepare_table(tables[b]), schema)
        assert out[b][1].equals(alone)
    assert stats.rows == 15 and stats.forward_calls == 3 and stats.errors == 0


def test_causal_summaries_stream_with_their_truncation_flags(rayinfer_llama):
    from rayinfer_tasks.summarize import SummarizeTask

    task = SummarizeTask(SummarizeTask.Options.model_validate({"max_new_tokens": 6, "max_input_tokens": 12,
                                                               "min_new_tokens": 2}),
                         LoadContext(model=str(rayinfer_llama)))
    task.load()
    runner = TaskRunner(task, max_batch_tokens=4096, max_batch_rows=3)
    assert runner.streams
    tables = [pa.table({"id": [f"r{b}{k}" for k in range(4)], "text": ["A short text."] + SENTENCES[b * 4: b * 4 + 3]})
              for b in range(3)]
    schema = output_schema(SummarizeTask, task.options, tables[0].schema, "id", [])
    entries = ((b, (t, runner.prepare_table(t))) for b, t in enumerate(tables))
    out = [t for _, t in runner.stream_tables(entries, schema, BatchStats())]
    for t, got in zip(tables, out):
        assert got.equals(runner.complete_table(t, runner.prepare_table(t), schema))
    flags = pa.concat_tables(out).column("truncated").to_pylist()
    assert True in flags and False in flags


def test_a_failing_stream_isolates_its_bad_row_and_goes_on_streaming(rayinfer_llama, monkeypatch):
    """A forward that fails on one prompt's tokens mid-stream: the rows in flight run batch by
    batch, cut in halves to the bad row (its error names the failure), the stream goes on with
    the later batches, and every other row equals its batch run alone."""
    runner = _generate_runner(rayinfer_llama)
    tables = _tables(3, 5)
    schema = output_schema(GenerateTask, runner.task.options, tables[0].schema, "id", [])
    want = [runner.complete_table(t, runner.prepare_table(t), schema) for t in tables]
    tok = runner.task.tokenizer
    bad = 6  # row r6, in the second batch
    others = set().union(*(tok(s)["input_ids"] for k, s in enumerate(SENTENCES[:15]) if k != bad))
    marker = next(t for t in tok(SENTENCES[bad])["input_ids"] if t not in others)
    forward = runner.task.model.forward

    @functools.wraps(forward)  # its signature: the decode loop reads which cache argument it takes
    def failing(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == marker).any()):
            raise RuntimeError("a kernel failed on this row")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.task.model, "forward", failing)
    _, out, stats = _streamed(runner, tables)
    got = pa.concat_tables([t for _, t in out])
    assert got.column("id").to_pylist() == [f"r{k}" for k in range(15)]
    errors = got.column("error").to_pylist()
    assert errors[bad] == "forward failed: RuntimeError: a kernel failed on this row"
    assert [e for k, e in enumerate(errors) if k != bad] == [None] * 14
    expected = pa.concat_tables(want)
    keep = [k for k in range(15) if k != bad]
    assert got.take(keep).column("generated").equals(expected.take(keep).column("generated"))
    assert stats.errors == 1 and stats.error_kinds["forward"] == 1


def test_a_sticky_device_error_in_a_stream_is_raised_at_once(rayinfer_llama, monkeypatch):
    runner = _generate_runner(rayinfer_llama)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.task.model, "forward", broken)
    with pytest.raises(DeviceFailure):
        _streamed(runner, _tables(2, 3))
    assert len(calls) == 1  # not halved: every later call would fail too


# -- the unit loop: a job's unit, file in, parts out ------------------------------------------------


def test_a_units_batches_stream_and_commit_the_rows_of_a_batch_by_batch_run(rayinfer_llama, tmp_path):
    """The actors' unit loop (no Ray) on 29 JSON Lines rows in batches of 6, one of them a
    malformed line and one an empty prompt: streamed, every id once in input order, the bad rows
    their errors, and every output equal to the same unit run batch by batch (streams off)."""
    import pyarrow.parquet as pq

    from rayinfer.io.folder import prepare
    from rayinfer.io.store import list_parts
    from rayinfer.plan.job import plan_job
    from rayinfer.plan.work import make_units
    from rayinfer.run.cluster import actor_args
    from rayinfer.run.unit import UnitLoop
    from rayinfer.task.registry import load_registry

    lines = [json.dumps({"id": f"r{k}", "prompt": "" if k == 11 else SENTENCES[k]}) for k in range(29)]
    lines[17] = '{"id": "r17", "prompt": "cut off'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    registry = load_registry()

    def run(out: str, streams: bool) -> tuple[list[dict], BatchStats]:
        job = {"task": "generate", "model": str(rayinfer_llama), "input": {"path": str(tmp_path / "in")},
               "output": {"path": str(tmp_path / out)}, "options": {"max_new_tokens": 6},
               "runtime": {"batch_size": 6}}
        plan = plan_job(job, registry=registry)
        prepare(str(tmp_path / out), plan.spec.output.mode)
        args = actor_args(plan, str(tmp_path / out), f"run-{out}")
        task = GenerateTask(plan.options, LoadContext(model=str(rayinfer_llama)))
        task.load()
        runner = TaskRunner(task, **args["runner"])
        assert runner.streams
        task.streams = streams
        if streams:  # every row through forward_stream: forward is for a failing stream's rows only
            task.forward = lambda items: pytest.fail("forward called while the unit streamed")
        loop = UnitLoop(runner, args["settings"])
        units = make_units(plan.files, {}, 1000)
        assert len(units) == 1
        reports = [r for unit in units for r in loop.run_unit(unit)]
        rows = [r for p in list_parts(str(tmp_path / out)) for r in pq.read_table(tmp_path / out / p).to_pylist()]
        return rows, reports

    streamed, reports = run("streamed", True)
    alone, _ = run("alone", False)
    assert [r["id"] for r in streamed] == [f"r{k}" for k in range(29)]
    assert streamed == alone
    errors = {r["id"]: r["error"] for r in streamed if r["error"]}
    assert len(errors) == 2 and errors["r11"] == "input 'prompt' is empty"
    assert sum(r.column("rows")[0].as_py() for r in reports) == 29  # the progress reports count every row
