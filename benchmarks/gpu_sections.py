"""The sections of ``benchmarks/gpu_check.py``: each a function of a Context that adds rows to the
report. Sizes are the real ones on a GPU and toy ones in a dry run (``ctx.size(full, dry)``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import MODELS, Report

CHAT = ["What does the Python statement `assert` do? Answer in two sentences.",
        "When would I use `lambda` in Python? Give one short example.",
        "Write a four-line poem about the sea at night.", "Write a short product description for a red bicycle.",
        "Give three tips for learning to cook.", "Explain saving money to a ten-year-old in a few sentences.",
        "Write a four-line poem about autumn leaves.", "Give three tips for public speaking.",
        "What does the Python statement `yield` do? Answer in two sentences.", "Describe a quiet library.",
        "Summarize: the sea is wide and the ships are many, and the harbour is full at night.",
        "Summarize: a garden needs water, light and patience; most of all patience."]
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass
class Context:
    out: Path
    device: str
    dry: bool
    report: Report
    built: dict[tuple[str, str], Path] = field(default_factory=dict)
    generated: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def size(self, full: Any, dry: Any) -> Any:
        return dry if self.dry else full

    def add(self, section: str, check: str, value: Any, ok: bool | None = None, note: str = "") -> None:
        self.report.add(section, check, value, ok, note)

    @property
    def run_dtype(self) -> str:
        """The dtype rayinfer's ``dtype: auto`` gives on this device."""
        return "bfloat16" if self.device == "cuda" else "float32"


def build(ctx: Context, kind: str, dtype: str = "float32") -> Path:
    """A model folder of ``kind`` (its config in gpu_models) with seeded random weights (wide
    enough that a greedy token is rarely a near-tie), saved in ``dtype``; toy-sized in a dry run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if (kind, dtype) in ctx.built:
        return ctx.built[(kind, dtype)]
    config = AutoConfig.from_pretrained(MODELS / kind)
    if ctx.dry:
        for k, v in TOY.items():
            setattr(config, k, v)
        if config.model_type == "llama":
            config.num_key_value_heads, config.head_dim = 2, 16
    cls = AutoModelForSequenceClassification if config.model_type == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = cls.from_config(config, dtype=torch.float32)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2, generator=g)
    folder = ctx.out / "models" / f"{kind}-{dtype}"
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    del model
    tokenizer = MODELS / "tokenizers" / ("bert" if config.model_type == "bert" else "smollm2")
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    ctx.built[(kind, dtype)] = folder
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return folder


def prompts_of_lengths(tokenizer: Any, n: int, low: int, high: int) -> list[str]:
    """n prompts of ``low``..``high`` tokens, spread evenly, cut from CPython's own documentation."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text)["input_ids"]
    out, at = [], 0
    for i in range(n):
        length = low + (high - low) * i // max(1, n - 1)
        out.append(tokenizer.decode(ids[at: at + length]))
        at = (at + length) % max(1, len(ids) - high)
    return out


def _generate(path: Path, rows: list[str], options: dict[str, Any], ctx: Context, dtype: str,
              rows_in_flight: int | None = None) -> list[dict[str, Any]]:
    """The generate task's rows (kept: parity's fp32 rows are bf16's reference too)."""
    from rayinfer_tasks.generate import GenerateTask

    from rayinfer.testing import run_task

    key = json.dumps([str(path), rows, options, dtype, rows_in_flight], sort_keys=True)
    if key not in ctx.generated:
        ctx.generated[key] = run_task(GenerateTask, [{"prompt": p} for p in rows], path, options, max_batch_tokens=16384,
                                      max_batch_rows=rows_in_flight, device=ctx.device, dtype=dtype)
    return ctx.generated[key]


def parity(ctx: Context) -> None:
    """fp32 greedy: rayinfer's decode loop (rows leaving and joining, 5 in flight) against
    ``model.generate`` on each prompt alone."""
    _parity(ctx, "parity", {})


def engine_transformers(ctx: Context) -> None:
    """``options.engine: transformers`` (generate_batch): fp32 greedy against ``generate`` alone."""
    _parity(ctx, "engine_transformers", {"engine": "transformers"})


def _parity(ctx: Context, section: str, engine: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayinfer.text import encode_prompts

    path = build(ctx, "smollm2-135m")
    prompts, new = CHAT[: ctx.size(12, 4)], ctx.size(48, 8)
    rows = _generate(path, prompts, {"chat": True, "max_new_tokens": new, **engine}, ctx, "float32", rows_in_flight=5)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(ctx.device).eval()
    equal = 0
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([encode_prompts(tok, [prompt], chat=True)[0]], device=ctx.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        n = next((j for j, t in enumerate(out) if t == tok.eos_token_id), len(out))
        equal += row["generated"] == tok.decode(out[:n], skip_special_tokens=True)
    ctx.add(section, f"fp32 greedy rows equal to generate on the prompt alone ({len(prompts)} chat prompts, "
            f"{new} new tokens)", f"{equal}/{len(prompts)}", equal == len(prompts))


def bf16(ctx: Context) -> None:
    """bf16 against fp32 on the same prompts: how much agrees (reported, not assumed)."""
    path = build(ctx, "smollm2-135m")
    prompts, new = CHAT[: ctx.size(12, 4)], ctx.size(48, 8)
    options = {"chat": True, "max_new_tokens": new}
    full = _generate(path, prompts, options, ctx, "float32", 5)
    half = _generate(path, prompts, options, ctx, "bfloat16", 5)
    same = sum(a["generated"] == b["generated"] for a, b in zip(full, half))
    prefix = [next((i for i, (x, y) in enumerate(zip(a["generated"], b["generated"])) if x != y),
                   min(len(a["generated"]), len(b["generated"]))) / max(1, len(a["generated"]))
              for a, b in zip(full, half)]
    ctx.add("bf16", "bf16 rows identical to fp32 (random weights: a lower bound for real ones)",
            f"{same}/{len(prompts)}", None, f"on average {100 * sum(prefix) / len(prefix):.0f}% of a row's text "
            "before the first difference")


def seeded(ctx: Context) -> None:
    """Sampling with a seed: each row's text the same at 1, 7 and all rows in flight."""
    path = build(ctx, "smollm2-135m")
    n = ctx.size(64, 16)
    prompts = [f"{CHAT[i % len(CHAT)]} ({i})" for i in range(n)]
    options = {"chat": True, "max_new_tokens": ctx.size(32, 8), "do_sample": True, "seed": 7, "temperature": 0.8,
               "top_p": 0.9, "top_k": 50}
    runs = {k: [r["generated"] for r in _generate(path, prompts, options, ctx, ctx.run_dtype, k)] for k in (1, 7, n)}
    same = all(runs[k] == runs[1] for k in runs)
    ctx.add("seeded", f"seeded rows identical at {', '.join(map(str, runs))} rows in flight ({ctx.run_dtype})",
            "yes" if same else f"{sum(a == b for a, b in zip(runs[n], runs[1]))}/{n} at {n}", same)


def constraints(ctx: Context) -> None:
    """json_schema output: every row that meets its constraint parses and fits it."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        ctx.add("constraints", "skipped", "llguidance is not installed", None, "benchmarks/gpu_wheels.txt carries it")
        return
    path = build(ctx, "smollm2-135m")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    rows = _generate(path, CHAT[: ctx.size(12, 4)], {"chat": True, "max_new_tokens": 48, "json_schema": schema},
                     ctx, ctx.run_dtype)
    met = [json.loads(r["generated"]) for r in rows if r["error"] is None]
    fits = all(isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("age"), int) for m in met)
    ctx.add("constraints", "json_schema rows that parse and fit / met", f"{len(met)} of {len(rows)} met", fits,
            f"{len(rows) - len(met)} constraint_unmet (random weights wander)")


def encoders(ctx: Context) -> None:
    """classify on a BERT-base shape in bf16 against fp32."""
    from rayinfer_tasks.classify import ClassifyTask

    from rayinfer.testing import english_sentences, run_task

    path = build(ctx, "bert-base")
    texts = [{"text": t} for t in english_sentences()[: ctx.size(512, 32)]]
    full = run_task(ClassifyTask, texts, path, {}, device=ctx.device, dtype="float32")
    half = run_task(ClassifyTask, texts, path, {}, device=ctx.device, dtype="bfloat16")
    labels = sum(a["label"] == b["label"] for a, b in zip(full, half)) / len(texts)
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(full, half))
    ctx.add("encoders", "classify bf16 vs fp32: labels equal, largest score difference",
            f"{100 * labels:.1f}%, {worst:.4f}", None, f"{len(texts)} texts")


def host_reads(ctx: Context) -> None:
    """Device reads per decode step of a greedy decode with every row in flight (on CUDA also the
    syncs torch counts)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayinfer import decoding

    path = build(ctx, "smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, ctx.run_dtype)).to(ctx.device).eval()
    n = ctx.size(256, 64)
    ids = [tok(p)["input_ids"] for p in prompts_of_lengths(tok, n, 20, ctx.size(200, 40))]
    stats = decoding.DecodeStats()
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            decoding.decode(model, ids, max_new_tokens=ctx.size(32, 8), eos={tok.eos_token_id}, pad=tok.eos_token_id,
                            slots=n, stats=stats)
        finally:
            if ctx.device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    per_step = stats.step_reads / max(1, stats.steps)
    ctx.add("host_reads", f"device reads per decode step, {n} rows in flight (counted by the loop)",
            f"{per_step:.2f} ({stats.step_reads} in {stats.steps} steps)", per_step <= 1)
    if ctx.device == "cuda":
        syncs = sum("synchronizing" in str(w.message) for w in caught)
        ctx.add("host_reads", "CUDA syncs torch saw, per decode step (prefills included)",
                f"{syncs / max(1, stats.steps):.2f} ({syncs} in {stats.steps} steps, {stats.prefills} prefills)")


def split(ctx: Context) -> None:
    """A model placed across cuda:0 and the CPU (``device_map``, as an actor with several GPUs
    places it across them): the decode loop keeps each layer's KV on that layer's device, and
    its greedy tokens equal ``generate``'s on each prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayinfer import decoding
    from rayinfer.text import encode_prompts

    path = build(ctx, "smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    if ctx.device == "cuda":  # about half the layers on the GPU, the rest on the CPU
        placed = {"device_map": "auto", "max_memory": {0: 300 << 20, "cpu": 64 << 30}}
    else:
        placed = {"device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **placed).eval()
    devices = sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()})
    prompts, new = CHAT[: ctx.size(8, 4)], ctx.size(32, 8)
    ids = encode_prompts(tok, prompts, chat=True)
    with torch.inference_mode():
        got = decoding.decode(model, ids, max_new_tokens=new, eos={tok.eos_token_id}, pad=tok.eos_token_id, slots=4)
        equal = 0
        for row, mine in zip(ids, got):
            x = torch.tensor([row], device=model.device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, len(row):].tolist()
            n = next((j for j, t in enumerate(out) if t == tok.eos_token_id), len(out))
            equal += mine == out[:n]
    ctx.add("split", f"greedy rows equal to generate, the model on {' + '.join(devices)} ({len(prompts)} prompts, "
            f"{new} new tokens, fp32)", f"{equal}/{len(prompts)}", equal == len(prompts))
