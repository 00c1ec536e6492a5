"""Generation at its real size: rayinfer against a careful plain ``generate`` loop, in one run.

    python -m benchmarks.generation                       # both workloads, 2 repeats (~15 min on 2 cores)
    python -m benchmarks.generation --workloads chat --repeat 1
    python -m benchmarks.generation --continuous          # also transformers' generate_batch

Workloads (SmolLM2-135M-Instruct from the catalog, greedy, fp32, the model's chat template):
  chat       48 varied prompts (questions, short writing tasks, "Summarize: <paragraph>"),
             ``max_new_tokens: 128``: the ``generate`` task;
  summarize  Python-docs texts of 300-600 tokens (``--texts``, default 14: the topics of that length
             in CPython 3.11's docs; past 14, longer topics' paragraphs packed to that length) in
             the summarize task's prompt, ``max_new_tokens: 64``: the ``summarize`` task.

The peer is the loop a careful user writes: the model loaded once, the prompts encoded exactly as
rayinfer encodes them, sorted by length, left padding with an attention mask, ``model.generate``
on batches of B; every B of ``--batches`` is run and the best one reported. It runs in a fresh
process with all the machine's cores as torch threads. rayinfer runs ``run_job`` with no
``runtime`` keys (its defaults, as a user gets them) on the embedded Ray; its steady state is
from its first actor ready (the manifest's ``actor_ready_s``) to the end of the run.

Both decode greedily in fp32, so they generate the same tokens (for generate the benchmark
checks that rayinfer's token count equals the loop's): both rates are the loop's new tokens (up
to the first end-of-sequence) over each one's seconds. Printed: new tokens/s, rayinfer's ratio to
the best loop (medians over ``--repeat`` alternating rounds), and model FLOP/s (2 x non-embedding
parameters per token processed, prompt and new tokens, plus attention) as a share of the
machine's fp32 matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What does the Python statement `{}` do? Answer in two sentences.",
             "When would I use `{}` in Python? Give one short example."]
WRITING = ["Write a four-line poem about {}.", "Write a short product description for {}.",
           "Give three tips for {}.", "Explain {} to a ten-year-old in a few sentences."]
THINGS = ["the sea at night", "a red bicycle", "learning to cook", "a quiet library", "saving money",
          "autumn leaves", "a cup of tea", "running a marathon", "an old clock", "planting a garden",
          "a rainy Monday", "public speaking", "a mountain lake", "moving to a new city", "a friendly robot",
          "writing clean code"]


def chat_prompts(n: int = 48) -> list[str]:
    """n varied prompts: a third questions about Python keywords, a third writing tasks, a third
    "Summarize:" with a paragraph of the Python docs."""
    from pydoc_data.topics import topics

    from rayinfer.demo import documents

    words = [k for k in sorted(topics) if k.isalpha() and k.islower()][: n // 3]
    docs = [d["text"] for d in documents(max_chars=500)]
    third = n // 3
    out = [QUESTIONS[i % 2].format(w) for i, w in enumerate(words)]
    out += [WRITING[i % len(WRITING)].format(THINGS[i % len(THINGS)]) for i in range(third)]
    out += [f"Summarize: {docs[i * 3 % len(docs)]}" for i in range(n - len(out))]
    return out


def summarize_texts(model: str, n: int = 48) -> list[str]:
    """n texts of the Python docs of 300-600 tokens: the topics that are that long (14 on CPython
    3.11), then consecutive paragraphs of the longer topics packed into texts of that length."""
    import re

    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from rayinfer.demo import documents

    tok = AutoTokenizer.from_pretrained(model)

    def tokens(text: str) -> int:
        return len(tok(text)["input_ids"])

    fit = [t for t in (d["text"] for d in documents(max_chars=3000)) if 300 <= tokens(t) <= 600]
    for key in sorted(topics):
        prose = [re.sub(r"\s+", " ", p.strip()) for p in re.split(r"\n\s*\n", topics[key])[1:]
                 if p.strip() and not p.startswith((" ", "*", "=", "-", ">>>")) and "::=" not in p and len(p) > 60]
        chunk: list[str] = []
        for p in prose:
            if len(fit) >= n:
                return fit[:n]
            if chunk and tokens("\n\n".join(chunk + [p])) > 600:
                text = "\n\n".join(chunk)
                if tokens(text) >= 300 and text not in fit:
                    fit.append(text)
                chunk = []
            chunk.append(p)
    return fit[:n]


def workloads(model: str, texts: int = 14) -> dict[str, dict[str, Any]]:
    return {
        "chat": {"task": "generate", "column": "prompt", "texts": chat_prompts(),
                 "options": {"chat": True, "max_new_tokens": 128}},
        "summarize": {"task": "summarize", "column": "text", "texts": summarize_texts(model, texts),
                      "options": {"chat": True, "max_new_tokens": 64}},
    }


def encoded(model: str, work: dict[str, Any]) -> list[list[int]]:
    """The token ids rayinfer's task would give the model, for the loop to use."""
    from transformers import AutoTokenizer

    from rayinfer.text import encode_prompts

    tok = AutoTokenizer.from_pretrained(model)
    if work["task"] == "summarize":
        from rayinfer_tasks.summarize import DEFAULT_INSTRUCTION

        return encode_prompts(tok, [DEFAULT_INSTRUCTION.replace("{text}", t) for t in work["texts"]], chat=True)
    return encode_prompts(tok, work["texts"], chat=True)


LOOP = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, batch, max_new, ids_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(int(sys.argv[5]))
device = sys.argv[6]
prompts = json.load(open(ids_file))
tok = AutoTokenizer.from_pretrained(model_dir)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
new_tokens = 0
t0 = time.perf_counter()
with torch.inference_mode():
    for s in range(0, len(order), batch):
        rows = [prompts[i] for i in order[s:s + batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)[:, width:].tolist()
        for row in out:
            new_tokens += next((j for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
print(json.dumps({"seconds": time.perf_counter() - t0, "new_tokens": new_tokens}))
"""


CONTINUOUS = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
model_dir, max_new, ids_file, threads, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
prompts = json.load(open(ids_file))
tok = AutoTokenizer.from_pretrained(model_dir)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=pad)
from rayinfer_tasks._generation import paged_config  # its best setting: the page table sized for the rows
sized = paged_config(prompts, max_new)
model.generate_batch(inputs=prompts[:2], generation_config=config, continuous_batching_config=sized)  # warm-up
t0 = time.perf_counter()
with torch.inference_mode():
    out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=sized)
new_tokens = 0
for o in out.values():
    row = list(o.generated_tokens)
    new_tokens += next((j for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
print(json.dumps({"seconds": time.perf_counter() - t0, "new_tokens": new_tokens, "rows": len(out)}))
"""


def run_continuous(model: str, ids: list[list[int]], max_new: int, tmp: Path, device: str = "cpu") -> dict[str, float]:
    """transformers' own continuous batching (``model.generate_batch``, paged attention) on the prompts."""
    ids_file = tmp / "ids.json"
    ids_file.write_text(json.dumps(ids))
    res = subprocess.run([sys.executable, "-c", CONTINUOUS, model, str(max_new), str(ids_file),
                          str(os.cpu_count() or 1), device], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_loop(model: str, ids: list[list[int]], batch: int, max_new: int, tmp: Path, device: str = "cpu") -> dict[str, float]:
    """The careful user's loop (in a fresh process): sorted prompts, left padding, ``model.generate``
    on batches of ``batch``; fp32 on CPUs, bfloat16 on a GPU."""
    ids_file = tmp / "ids.json"
    ids_file.write_text(json.dumps(ids))
    res = subprocess.run([sys.executable, "-c", LOOP, model, str(batch), str(max_new), str(ids_file),
                          str(os.cpu_count() or 1), device], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_rayinfer(model: str, work: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from rayinfer.api import run_job

    data = tmp / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(work["texts"]))), work["column"]: work["texts"]}), data)
    out = tmp / "out"
    spec = {"task": work["task"], "model": model, "input": {"path": str(data), "columns": {
        ("prompt" if work["task"] == "generate" else "text"): work["column"]}},
        "output": {"path": str(out), "mode": "overwrite"}, "options": work["options"]}
    manifest = run_job(spec)
    table = pq.read_table(out)
    new_tokens = sum(table.column("num_tokens").to_pylist()) if work["task"] == "generate" else None
    ready = min(manifest["actor_ready_s"].values())
    return {"seconds": manifest["duration_s"] - ready, "new_tokens": new_tokens, "actors": len(manifest["actors"]),
            "errors": manifest["errors"]}


def model_flops(model: str, ids: list[list[int]], new_tokens: int) -> float:
    """FLOPs of a run: every prompt token and every new token once, 2 x non-embedding params each,
    plus attention over the context so far."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    mean_new = new_tokens / max(1, len(ids))
    flops = 0.0
    for row in ids:
        n, m = len(row), mean_new
        flops += 2 * params * (n + m) + 4 * layers * h * ((n * n) / 2 + m * (n + m / 2))
    return flops


def matmul_flops(seconds: float = 3.0, n: int = 1024) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="chat,summarize")
    parser.add_argument("--batches", default="16,32,48", help="The loop's batch sizes to try (the best is the peer).")
    parser.add_argument("--repeat", type=int, default=2, help="Alternating rounds of (best loop, rayinfer).")
    parser.add_argument("--continuous", action="store_true",
                        help="Also transformers' continuous batching (generate_batch) as a peer.")
    parser.add_argument("--texts", type=int, default=14, help="Texts of the summarize workload (14: the whole topics; more: packed paragraphs).")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rayinfer.models import catalog

    model = str(catalog.fetch("smollm2-135m-instruct"))
    peak = matmul_flops()
    print(f"fp32 matmul: {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} threads")
    rows = []
    for name in args.workloads.split(","):
        work = workloads(model, args.texts)[name]
        ids = encoded(model, work)
        max_new = work["options"]["max_new_tokens"]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            loops = {b: run_loop(model, ids, b, max_new, tmp) for b in map(int, args.batches.split(","))}
            for b, r in loops.items():
                print(f"{name}: loop batch {b}: {r['new_tokens'] / r['seconds']:.1f} new tokens/s ({r['seconds']:.1f} s)")
            best = max(loops, key=lambda b: loops[b]["new_tokens"] / loops[b]["seconds"])
            tokens = loops[best]["new_tokens"]
            if args.continuous:
                cb = run_continuous(model, ids, max_new, tmp)
                print(f"{name}: transformers generate_batch: {tokens / cb['seconds']:.1f} new tokens/s "
                      f"({cb['seconds']:.1f} s, {cb['new_tokens']} new tokens)")
            loop_rates, ri_rates = [tokens / loops[best]["seconds"]], []
            for i in range(args.repeat):
                if i:
                    loop_rates.append(tokens / run_loop(model, ids, best, max_new, tmp)["seconds"])
                ri = run_rayinfer(model, work, tmp)
                ri_rates.append(tokens / ri["seconds"])
                same = "" if ri["new_tokens"] in (None, tokens) else f", {ri['new_tokens']} new tokens, the loop {tokens}!"
                print(f"{name}: rayinfer: {ri_rates[-1]:.1f} new tokens/s ({ri['seconds']:.1f} s steady, "
                      f"{ri['actors']} actor(s), {ri['errors']} errors{same})")
            loop_rate, ri_rate = statistics.median(loop_rates), statistics.median(ri_rates)
            rows.append((name, len(ids), max_new, best, loop_rate, ri_rate, model_flops(model, ids, tokens) * ri_rate / tokens / peak))
    print("\n| workload | rows | new tokens | loop (best batch) | loop tok/s | rayinfer tok/s | ratio | rayinfer % of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, max_new, best, loop_rate, ri_rate, share in rows:
        print(f"| {name} | {n} | {max_new} | {best} | {loop_rate:.1f} | {ri_rate:.1f} | {ri_rate / loop_rate:.2f}x | "
              f"{share:.1%} |")


if __name__ == "__main__":
    main()
