"""Rows streaming across batches, against the same decode loop draining at the end of every batch.

    python -m benchmarks.streaming                  # 96 chat prompts, batches of 32, 2 rounds (~5 min on 2 cores)
    python -m benchmarks.streaming --rows 64 --batch 16 --repeat 1

The generate task on SmolLM2-135M-Instruct (the catalog), greedy fp32, the chat workload of
``benchmarks/generation.py`` (``max_new_tokens: 128``), loaded once in this process. The task's
runner takes ``--batch`` rows at a time with at most ``--slots`` rows in flight, as an actor's
unit loop does. ``per batch``: each batch through ``forward`` alone, so the decode loop drains
to zero rows before the next batch joins (rayinfer before streaming, and every task that does not
stream). ``streamed``: the batches through ``TaskRunner.stream_tables`` (what the unit loop does
for generate now): the next batch's rows join as slots free. The shape is a GPU actor's (slots
= rows per batch, where a batch drains fully) on the CPU; the CPU default (256-row batches, 32
slots) drains once per 256 rows. Rounds alternate; the outputs must be equal row for row.
Printed: new tokens/s of each (median over rounds) and the ratio, and the decode steps each took
with the rows in flight per step: on a GPU a step costs about the same for 8 rows as for 256, so
fewer, fuller steps are what streaming turns into speed there; on CPU cores a step's cost grows
with its rows, so the drain costs little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import pyarrow as pa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32, help="Rows per runner batch (runtime.batch_size).")
    parser.add_argument("--slots", type=int, default=32, help="Rows in flight (the CPU actors' default: 32).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rayinfer_tasks.generate import GenerateTask

    from benchmarks.generation import chat_prompts
    from rayinfer.models import catalog
    from rayinfer.models.load import LoadContext
    from rayinfer.task.runner import BatchStats, TaskRunner, output_schema

    model = str(catalog.fetch("smollm2-135m-instruct"))
    options = GenerateTask.Options.model_validate({"chat": True, "max_new_tokens": args.max_new_tokens})
    task = GenerateTask(options, LoadContext(model=model))
    task.load()
    runner = TaskRunner(task, max_batch_tokens=16384, max_batch_rows=args.slots)
    prompts = (chat_prompts() * (args.rows // 48 + 1))[: args.rows]
    tables = [pa.table({"id": [f"r{k}" for k in range(a, min(a + args.batch, args.rows))], "prompt": prompts[a: a + args.batch]})
              for a in range(0, args.rows, args.batch)]
    schema = output_schema(GenerateTask, options, tables[0].schema, "id", [])

    def per_batch() -> pa.Table:
        return pa.concat_tables([runner.complete_table(t, runner.prepare_table(t), schema) for t in tables])

    def streamed() -> pa.Table:
        entries = ((b, (t, runner.prepare_table(t))) for b, t in enumerate(tables))
        return pa.concat_tables([out for _, out in runner.stream_tables(entries, schema, BatchStats())])

    from rayinfer.decoding import loop

    steps = {"steps": 0, "rows": 0}
    plain_step = loop._Loop._step

    def counted_step(self: Any) -> None:  # the decode steps and the rows in flight in each
        steps["steps"] += 1
        steps["rows"] += sum(r is not None for r in self.slot_row)
        plain_step(self)

    loop._Loop._step = counted_step  # type: ignore[method-assign]
    shape: dict[str, tuple[int, float]] = {}
    rates: dict[str, list[float]] = {"per batch": [], "streamed": []}
    outputs: dict[str, pa.Table] = {}
    for i in range(args.repeat):
        for name, run in (("per batch", per_batch), ("streamed", streamed)):
            steps.update(steps=0, rows=0)
            started = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - started
            tokens = sum(out.column("num_tokens").to_pylist())
            rates[name].append(tokens / seconds)
            outputs[name] = out
            shape[name] = (steps["steps"], steps["rows"] / max(1, steps["steps"]))
            print(f"round {i + 1}: {name}: {tokens / seconds:.1f} new tokens/s ({tokens} tokens, {seconds:.1f} s)", flush=True)
    same = outputs["per batch"].equals(outputs["streamed"])
    base, new = statistics.median(rates["per batch"]), statistics.median(rates["streamed"])
    print(f"\n{args.rows} chat prompts, batches of {args.batch}, {args.slots} slots, {args.max_new_tokens} new tokens; "
          f"outputs equal: {same}")
    print("| mode | new tokens/s | ratio | decode steps | rows in flight per step |\n|---|---|---|---|---|")
    for name, rate in (("per batch", base), ("streamed", new)):
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {shape[name][0]} | {shape[name][1]:.1f} |")
    if not same:
        raise SystemExit("streamed outputs differ from per-batch outputs")


if __name__ == "__main__":
    main()
