"""What each generation lever gives, in one process, without Ray (the decode loop alone).

    python -m benchmarks.levers                 # chat workload: 48 prompts x 128 new tokens (~3 min on 2 cores)
    python -m benchmarks.levers --rows 24 --new 64
    python -m benchmarks.levers --compile       # also the loop with a static cache and torch.compile

Rows, each on the same prompts (benchmarks/generation.py's chat workload, SmolLM2-135M-Instruct,
greedy, the chat template), measured in this run:
  loop        the plain ``model.generate`` loop at batch 32 (its best on 2 cores), fp32;
  + compile   (``--compile``) the loop with a static KV cache and ``torch.compile`` (inductor),
              transformers' own way (``cache_implementation="static"``, a ``CompileConfig``),
              compiled on a warm-up batch first (not timed);
  engine      ``rayinfer.decoding.decode``: a KV-cache slot per row, rows leave and join
              (continuous batching, 32 in flight), prefill in passes of similar lengths, fp32;
  + prepack   the same after ``rayinfer.decoding.prepare`` (linear layers through oneDNN with
              prepacked weights), fp32: what ``generate`` runs by default on CPUs;
  + bf16      the same with the model in bfloat16 (``runtime.dtype: bfloat16``): outputs change,
              so its agreement with fp32 is printed (rows with the same text; tokens of the
              common prefix over fp32's tokens).
Each row prints new tokens/s (fp32's new-token count over its seconds, so rates compare), its
ratio to the loop, and the engine's own counts (prefill tokens, decode steps, slot use).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any


def loop(model: Any, tok: Any, prompts: list[list[int]], batch: int, new: int, compiled: bool = False
         ) -> tuple[float, list[list[int]]]:
    """The plain loop; ``compiled``: with a static KV cache and ``torch.compile`` (transformers'
    own: ``cache_implementation="static"`` and a compile config that allows CPUs), after a warm-up
    batch that compiles it (not timed)."""
    import torch
    from transformers import CompileConfig

    extra: dict[str, Any] = {}
    if compiled:
        config = CompileConfig(dynamic=True)
        config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": config}

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    if compiled:  # compile once (a batch of the longest prompts), then time the loop
        warm = torch.tensor([prompts[order[-1]]] * min(batch, len(order)))
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False,
                       pad_token_id=pad, eos_token_id=tok.eos_token_id, **extra)
    start = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        rows = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=pad, eos_token_id=tok.eos_token_id, **extra)[:, width:].tolist()
        for i, row in zip(idx, rows):
            out[i] = row[: next((j for j, t in enumerate(row) if t == tok.eos_token_id), len(row))]
    return time.perf_counter() - start, [out[i] for i in range(len(prompts))]


def engine(model: Any, tok: Any, prompts: list[list[int]], slots: int, new: int) -> tuple[float, list[list[int]], Any]:
    from rayinfer import decoding

    stats = decoding.DecodeStats()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as the runner gives them
    start = time.perf_counter()
    got = decoding.decode(model, [prompts[i] for i in order], max_new_tokens=new, eos={tok.eos_token_id},
                          pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                          slots=slots, budget=16384, stats=stats)
    seconds = time.perf_counter() - start
    out: list[list[int]] = [[] for _ in prompts]
    for i, g in zip(order, got):
        out[i] = g
    return seconds, out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--new", type=int, default=128, help="max_new_tokens")
    parser.add_argument("--batch", type=int, default=32, help="The loop's batch and the engine's slots.")
    parser.add_argument("--compile", action="store_true", help="Also the loop with a static cache and torch.compile.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.generation import chat_prompts
    from rayinfer import decoding
    from rayinfer.models import catalog
    from rayinfer.text import encode_prompts

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(catalog.fetch("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = encode_prompts(tok, chat_prompts(args.rows), chat=True)

    def fresh(dtype: Any) -> Any:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    rows = []
    with torch.inference_mode():
        seconds, base = loop(fresh(torch.float32), tok, prompts, args.batch, args.new)
        tokens = sum(map(len, base))
        rows.append(("loop (generate, batch %d)" % args.batch, seconds, base, None))
        model = fresh(torch.float32)
        rows.append(("engine", *engine(model, tok, prompts, args.batch, args.new)))
        decoding.prepare(model)
        rows.append(("engine + prepack (default)", *engine(model, tok, prompts, args.batch, args.new)))
        model = fresh(torch.bfloat16)
        decoding.prepare(model)
        rows.append(("engine + prepack + bf16", *engine(model, tok, prompts, args.batch, args.new)))
        if args.compile:  # last: compiling leaves the process changed (its worker pool, inductor's state)
            seconds, out = loop(fresh(torch.float32), tok, prompts, args.batch, args.new, compiled=True)
            rows.append(("loop + static cache + torch.compile", seconds, out, None))
    loop_rate = tokens / rows[0][1]
    print(f"{args.rows} chat prompts x {args.new} new tokens, {tokens} new tokens (fp32 greedy), "
          f"{os.cpu_count()} threads\n")
    print("| run | seconds | new tokens/s | vs loop | same text as fp32 loop | prefill tokens | steps | slot use |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seconds, out, stats in rows:
        same = sum(a == b for a, b in zip(out, base))
        prefix = sum(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in zip(out, base))
        agree = f"{same}/{len(base)} rows, {prefix / tokens:.0%} of tokens"
        counts = ("", "", "") if stats is None else (
            stats.prefill_tokens, stats.steps, f"{stats.row_steps / max(1, stats.slot_steps):.0%}")
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:.1f} | {tokens / seconds / loop_rate:.2f}x | {agree} | "
              f"{counts[0]} | {counts[1]} | {counts[2]} |")


if __name__ == "__main__":
    main()
