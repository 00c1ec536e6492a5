"""The runner's guarantees, on a pure-Python task (no model needed to test the mechanism)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from rayinfer import RowError, Task, TaskOptions
from rayinfer.models.load import LoadContext
from rayinfer.task.runner import BatchStats, TaskRunner, micro_batches


class WordStats(Task):
    """Counts words; 'POISON' makes forward fail for the whole micro-batch it lands in."""

    name = "word-stats"

    class Options(TaskOptions):
        reject: str = Field("REJECT", description="Rows containing this are rejected in preprocess.")

    calls: list[list[int]]

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([("words", pa.int64()), ("first", pa.string())])

    def load(self) -> None:
        self.calls = []

    def preprocess(self, batch: dict[str, list[Any]]) -> list[Any]:
        return [
            RowError("rejected", "rejected") if self.options.reject in t else {"input_ids": t.split()}
            for t in batch["text"]
        ]

    def forward(self, items: list[Any]) -> list[Any]:
        self.calls.append([len(i["input_ids"]) for i in items])
        if any("POISON" in i["input_ids"] for i in items):
            raise ValueError("poisoned batch")
        return [(len(i["input_ids"]), i["input_ids"][0]) for i in items]

    def postprocess(self, outputs: list[Any], batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"words": [o[0] for o in outputs], "first": [o[1] for o in outputs]}


def make_runner(budget: int = 1000) -> TaskRunner:
    task = WordStats(WordStats.Options(), LoadContext(model="none"))
    task.load()
    return TaskRunner(task, max_batch_tokens=budget)


def test_micro_batches_respect_the_budget_and_keep_long_rows_alone():
    lengths = {0: 10, 1: 2, 2: 7, 3: 3, 4: 30}
    order = sorted(lengths, key=lambda i: -lengths[i])
    chunks = micro_batches(order, lengths, max_tokens=24)
    assert chunks == [[4], [0, 2], [3, 1]]
    assert sorted(i for c in chunks for i in c) == [0, 1, 2, 3, 4]


def test_micro_batches_end_where_rows_get_much_shorter_once_half_the_budget_is_used():
    lengths = dict(enumerate([10] * 5 + [9] * 2 + [7] * 3))
    order = sorted(lengths, key=lambda i: -lengths[i])
    # 7 rows of <= 10 tokens hold 70 of 100: a row of 7 (> 20% shorter) starts a new pass
    assert micro_batches(order, lengths, max_tokens=100) == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]
    # under half the budget, short rows join the pass rather than making many small ones
    assert micro_batches(order, lengths, max_tokens=300) == [list(range(10))]


def test_decode_batches_are_cut_by_rows_within_the_budget_never_for_padding():
    """A decoding task's chunk is a whole decode loop: up to max_rows rows, within the token
    budget, and no cut where rows get shorter (the 48 chat prompts were cut 16 + 32 that way)."""
    lengths = dict(enumerate([288] * 16 + [200] * 16 + [170] * 16))
    order = sorted(lengths, key=lambda i: -lengths[i])
    assert [len(c) for c in micro_batches(order, lengths, 8192)] == [16, 32]
    assert [len(c) for c in micro_batches(order, lengths, 16384, max_rows=32)] == [32, 16]
    assert [len(c) for c in micro_batches(order, lengths, 4096, max_rows=32)] == [14, 14, 20]
    assert sorted(i for c in micro_batches(order, lengths, 16384, max_rows=5) for i in c) == list(range(48))


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from("ab cd ef gh".split()), min_size=1, max_size=12), max_size=40),
       budget=st.integers(1, 64))
def test_outputs_are_in_input_order_and_equal_to_unbatched(texts, budget):
    rows = [" ".join(t) for t in texts]
    runner = make_runner(budget)
    cols, errors = runner.run({"text": rows})
    assert errors == [None] * len(rows)
    single = [make_runner(10**6).run({"text": [r]})[0] for r in rows]
    assert cols["words"] == [s["words"][0] for s in single] == [len(t) for t in texts]
    assert cols["first"] == [t[0] for t in texts]
    # every forward call stayed within the budget, unless a single row exceeded it
    for call in runner.task.calls:
        assert len(call) * max(call) <= budget or len(call) == 1


def test_a_failing_row_is_isolated_and_its_batch_mates_survive():
    rows = ["one two", "x POISON y", "three", "", None, "a REJECT b", "four five six"]
    runner = make_runner()
    stats = BatchStats()
    cols, errors = runner.run({"text": rows}, stats)
    assert cols["words"] == [2, None, 1, None, None, None, 3]
    assert errors[1].kind == "forward" and "poisoned batch" in errors[1].message
    assert errors[3].kind == "empty_input" and errors[4].kind == "null_input"
    assert errors[5].kind == "rejected"
    assert stats.errors == 4 and stats.rows == 7
    assert dict(stats.error_kinds) == {"forward": 1, "empty_input": 1, "null_input": 1, "rejected": 1}


def test_a_table_of_rows_gets_the_output_schema_with_id_and_keep_columns():
    from rayinfer.task.runner import output_schema

    table = pa.table({"doc": pa.array([7, 8], pa.int32()), "src": ["a", "b"], "body": ["hello world", ""]})
    schema = output_schema(WordStats, WordStats.Options(), table.schema, "doc", ["src"])
    runner = TaskRunner(make_runner().task, column_map={"text": "body"}, id_column="doc", keep=["src"])
    out = runner.complete_table(table, runner.prepare_table(table), schema)
    assert out.schema == schema
    assert out.to_pylist() == [
        {"doc": 7, "src": "a", "words": 2, "first": "hello", "error": None},
        {"doc": 8, "src": "b", "words": None, "first": None, "error": "input 'text' (column 'body') is empty"},
    ]
