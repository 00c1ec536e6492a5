"""Where generation's time goes: rayinfer's decode loop and the plain ``generate`` loop, by kind of work.

    python -m benchmarks.where                       # summarize workload, 14 texts (~4 min on 2 cores)
    python -m benchmarks.where --workload chat --rows 48 --new 128

Both run the same prompts (benchmarks/generation.py's workloads, SmolLM2-135M-Instruct, greedy,
fp32) under ``torch.profiler``; each operator's own CPU time is put in a kind:
  matmul     linear layers (oneDNN's prepacked or MKL's), the vocabulary projection included
  attention  scaled dot-product attention
  cache      writing and reading the KV cache: index_put, cat, copies, index_select
  sampling   argmax, softmax, sort, top-k, multinomial
  other ops  the rest (norms, activations, rotary embeddings, masks)
  Python     wall time no operator accounts for (the loop's own code, the model's Python)
printed for prefill (passes that bring rows in) and decode (one token a row) apart, in seconds and
as a share of the run, beside the loop's; and what a 2.0x ratio would leave for rayinfer's run.
The profiler adds its own overhead (a few %): the ratios, not the seconds, are the point.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import Any

KINDS = {
    "matmul": ("linear", "addmm", "aten::mm", "aten::bmm", "matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "cache": ("index_put", "aten::cat", "aten::copy_", "index_select", "aten::clone", "aten::contiguous"),
    "sampling": ("argmax", "softmax", "aten::sort", "topk", "multinomial", "cumsum"),
}
ORDER = ["matmul", "attention", "cache", "sampling", "other ops", "Python"]


def kind(name: str) -> str:
    for k, keys in KINDS.items():
        if any(key in name for key in keys):
            return k
    return "other ops"


PREFILL = "rayinfer.prefill"


def profiled(fn: Any) -> tuple[float, dict[str, dict[str, float]]]:
    """Run fn under the profiler: (wall seconds, {"prefill" | "decode": own CPU seconds per kind}),
    an operator being prefill's when it ran inside a ``record_function(PREFILL)`` range."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    by: dict[str, dict[str, float]] = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    for e in prof.events():
        if not e.name.startswith(("aten::", "mkldnn::")):
            continue
        parent, phase = e.cpu_parent, "decode"
        while parent is not None:
            if parent.name == PREFILL:
                phase = "prefill"
                break
            parent = parent.cpu_parent
        by[phase][kind(e.name)] += e.self_cpu_time_total / 1e6
    return wall, {k: dict(v) for k, v in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["chat", "summarize"], default="summarize")
    ap.add_argument("--rows", type=int, default=14, help="prompts (summarize: texts of 300-600 tokens)")
    ap.add_argument("--new", type=int, default=None, help="max_new_tokens (default: the workload's)")
    ap.add_argument("--batch", type=int, default=16, help="the loop's batch (its best of 16/32/48 here)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.generation import encoded, workloads
    from benchmarks.levers import loop
    from rayinfer import decoding
    from rayinfer.models import catalog

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(catalog.fetch("smollm2-135m-instruct"))
    work = workloads(path, args.rows)[args.workload]
    work["texts"] = work["texts"][: args.rows]
    ids = encoded(path, work)
    new = args.new or work["options"]["max_new_tokens"]
    tok = AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    runs: dict[str, dict[str, dict[str, float]]] = {}
    walls: dict[str, float] = {}
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prefill_wall = 0.0
        original = decoding.loop._Loop._join

        def join(self: Any, *a: Any) -> None:  # prefill passes marked apart from decode steps
            nonlocal prefill_wall
            start = time.perf_counter()
            with torch.profiler.record_function(PREFILL):
                original(self, *a)
            prefill_wall += time.perf_counter() - start

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        decoding.prepare(model)
        decoding.loop._Loop._join = join  # type: ignore[method-assign]
        try:
            wall, parts = profiled(lambda: decoding.decode(model, [ids[i] for i in order], max_new_tokens=new,
                                                           eos={tok.eos_token_id}, pad=pad, slots=32, budget=16384))
        finally:
            decoding.loop._Loop._join = original  # type: ignore[method-assign]
        parts["prefill"]["Python"] = max(0.0, prefill_wall - sum(parts["prefill"].values()))
        parts["decode"]["Python"] = max(0.0, wall - prefill_wall - sum(parts["decode"].values()))
        runs["rayinfer"], walls["rayinfer"] = parts, wall

        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        wall, by = profiled(lambda: loop(plain, tok, ids, args.batch, new))
        everything = {k: by["prefill"].get(k, 0.0) + by["decode"].get(k, 0.0) for k in ORDER}
        everything["Python"] = max(0.0, wall - sum(everything.values()))
        runs["loop"], walls["loop"] = {"all": everything}, wall

    total = walls["loop"]
    print(f"{args.workload}: {len(ids)} prompts ({sum(map(len, ids))} tokens) x {new} new tokens; loop batch "
          f"{args.batch}; seconds under the profiler (share of the loop's run)\n")
    print("| kind | rayinfer prefill | rayinfer decode | rayinfer all | loop (prefill + decode) |")
    print("|---|---|---|---|---|")
    for k in ORDER:
        p, d = runs["rayinfer"]["prefill"].get(k, 0.0), runs["rayinfer"]["decode"].get(k, 0.0)
        lo = runs["loop"]["all"].get(k, 0.0)
        print(f"| {k} | {p:.1f} | {d:.1f} | {p + d:.1f} ({(p + d) / total:.0%}) | {lo:.1f} ({lo / total:.0%}) |")
    p_all = sum(runs["rayinfer"]["prefill"].values())
    print(f"| **total** | {p_all:.1f} | {walls['rayinfer'] - p_all:.1f} | {walls['rayinfer']:.1f} "
          f"({walls['rayinfer'] / total:.0%}) | {total:.1f} |")
    ratio = total / walls["rayinfer"]
    need = (f"2.0x would need rayinfer's run at {total / 2:.1f} s: {walls['rayinfer'] - total / 2:.1f} s less, "
            f"where its prefill alone is {p_all:.1f} s") if ratio < 2 else "at or above 2.0x"
    print(f"\nratio under the profiler {ratio:.2f}x; {need}")


if __name__ == "__main__":
    main()
