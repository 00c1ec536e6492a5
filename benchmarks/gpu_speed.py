"""The speed sections of ``benchmarks/gpu_check.py``: rayinfer's tasks (their code path without Ray,
at the GPU defaults an actor gets: a 16,384-token budget per pass, bf16) against each peer at its
best setting, in the same run: ``model.generate`` on length-sorted, left-padded batches of 64-256,
transformers' own ``generate_batch``, the ``text-classification`` pipeline and
``SentenceTransformer.encode`` at their best batch sizes; and two processes sharing one GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.gpu_check import ROOT
from benchmarks.gpu_sections import Context, build, prompts_of_lengths

GPU_BATCH_TOKENS = 16384  # rayinfer's token budget per pass on GPU actors (rayinfer.spec)


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> str:
    import torch

    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""


def runner_of(task_cls: Any, path: Path, options: dict[str, Any], ctx: Context, dtype: str,
              max_batch_rows: int | None = None) -> Callable[[dict[str, list[Any]]], tuple[dict[str, list[Any]], list]]:
    """The task loaded once, as an actor holds it; returns its runner's ``run`` (what is timed)."""
    from rayinfer.models.load import LoadContext
    from rayinfer.models.locate import locate_model
    from rayinfer.task.runner import TaskRunner

    options = task_cls.options_for_model(task_cls.Options.model_validate(options), locate_model(str(path)))
    task = task_cls(options, LoadContext(model=str(path), device=ctx.device, dtype=dtype))
    task.load()
    return TaskRunner(task, max_batch_tokens=GPU_BATCH_TOKENS, max_batch_rows=max_batch_rows).run


def streamed(runner: Any, prompts: list[str], per: int) -> int:
    """The prompts through ``TaskRunner.stream_tables`` in batches of ``per`` (an actor's unit loop):
    the new tokens made."""
    import pyarrow as pa

    from rayinfer.task.runner import BatchStats, output_schema

    tables = [pa.table({"id": list(range(a, min(a + per, len(prompts)))), "prompt": prompts[a: a + per]})
              for a in range(0, len(prompts), per)]
    schema = output_schema(type(runner.task), runner.task.options, tables[0].schema, "id", [])
    entries = ((b, (t, runner.prepare_table(t))) for b, t in enumerate(tables))
    return sum(n or 0 for _, out in runner.stream_tables(entries, schema, BatchStats())
               for n in out.column("num_tokens").to_pylist())


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def decode_speed(ctx: Context) -> None:
    """New tokens/s and peak memory: the generate task against generate loops and generate_batch."""
    import torch
    from rayinfer_tasks._generation import paged_config
    from rayinfer_tasks.generate import GenerateTask
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rayinfer.text import encode_prompts

    n, new, dtype = ctx.size(512, 24), ctx.size(128, 8), ctx.run_dtype
    for kind in ctx.size(["smollm2-135m", "llama-1b"], ["smollm2-135m"]):
        path = build(ctx, kind, dtype)
        tok = AutoTokenizer.from_pretrained(path)
        prompts = prompts_of_lengths(tok, n, 20, ctx.size(600, 60))
        what = f"{kind}, {n} prompts of 20-{ctx.size(600, 60)} tokens, {new} new, {dtype}"
        run = runner_of(GenerateTask, path, {"max_new_tokens": new}, ctx, dtype)
        _peak_reset(ctx.device)
        (out, _), secs = _timed(lambda: run({"prompt": prompts}), ctx.device)
        ours = sum(out["num_tokens"][i] or 0 for i in range(n)) / secs
        budget = getattr(run.__self__.task, "kv_budget", None)  # type: ignore[attr-defined]
        ctx.add("decode_speed", f"rayinfer generate task ({what})", f"{ours:.0f} new tokens/s", None,
                f"{_peak(ctx.device)}; KV cache budget {budget if budget is not None else 'the token budget'} tokens")
        per = ctx.size(256, 8)  # as a job's unit loop gives them: runtime.batch_size rows at a time, streamed
        _peak_reset(ctx.device)
        made, secs = _timed(lambda: streamed(run.__self__, prompts, per), ctx.device)  # type: ignore[attr-defined]
        ctx.add("decode_speed", f"rayinfer generate task, streamed in batches of {per} ({kind})",
                f"{made / secs:.0f} new tokens/s", None, _peak(ctx.device))
        del run
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(ctx.device).eval()
        ids = encode_prompts(tok, prompts, chat=False)
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(n), key=lambda i: len(ids[i]))
        best = 0.0
        for b in ctx.size((64, 128, 256), (8, 24)):
            def loop() -> int:
                made = 0
                for k in range(0, n, b):
                    batch = [ids[i] for i in order[k: k + b]]
                    width = max(len(x) for x in batch)
                    x = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=ctx.device)
                    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=ctx.device)
                    with torch.inference_mode():
                        got = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                             pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
                    made += sum(next((j for j, t in enumerate(r) if t == eos), len(r)) for r in got)
                return made
            _peak_reset(ctx.device)
            made, secs = _timed(loop, ctx.device)
            best = max(best, made / secs)
            ctx.add("decode_speed", f"generate loop, batch {b} ({kind})", f"{made / secs:.0f} new tokens/s", None,
                    _peak(ctx.device))
        ctx.add("decode_speed", f"rayinfer / the best generate loop ({kind})", f"{ours / best:.2f}x")
        try:
            config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
            with torch.inference_mode():
                # at its best setting: its page table sized for the rows (the default sizes it by memory and clears
                # that much per call), as rayinfer's engine: transformers does
                sized = paged_config(ids, new)
                model.generate_batch(inputs=ids[:2], generation_config=config, continuous_batching_config=sized)  # warm-up
                _peak_reset(ctx.device)
                got, secs = _timed(lambda: model.generate_batch(inputs=ids, generation_config=config,
                                                                continuous_batching_config=sized), ctx.device)
            made = sum(next((j for j, t in enumerate(o.generated_tokens) if t == eos), len(o.generated_tokens))
                       for o in got.values())
            ctx.add("decode_speed", f"transformers generate_batch ({kind})", f"{made / secs:.0f} new tokens/s", None,
                    _peak(ctx.device))
            ctx.add("decode_speed", f"rayinfer / generate_batch ({kind})", f"{ours / (made / secs):.2f}x")
        except Exception as exc:  # its API moves between versions: say so, go on
            ctx.add("decode_speed", f"transformers generate_batch ({kind})", "could not run", None,
                    f"{type(exc).__name__}: {str(exc)[:200]}")
        del model
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


def texts(n: int) -> list[str]:
    from rayinfer.testing import english_sentences

    s = english_sentences()
    return [s[i % len(s)] for i in range(n)]


def classify_rate(path: Path, ctx: Context, n: int) -> float:
    from rayinfer_tasks.classify import ClassifyTask

    run = runner_of(ClassifyTask, path, {}, ctx, ctx.run_dtype)
    rows = texts(n)
    run({"text": rows[:64]})  # warm-up
    _, secs = _timed(lambda: run({"text": rows}), ctx.device)
    return n / secs


def encoder_speed(ctx: Context) -> None:
    """classify rows/s against the pipeline, embed rows/s against SentenceTransformer.encode."""
    import torch
    from transformers import pipeline

    n = ctx.size(8192, 128)
    path = build(ctx, "bert-base")
    ours = classify_rate(path, ctx, n)
    ctx.add("encoder_speed", f"rayinfer classify ({n} sentences, BERT-base shape, {ctx.run_dtype})", f"{ours:.0f} rows/s")
    best = 0.0
    for b in ctx.size((64, 256), (32,)):
        pipe = pipeline("text-classification", model=str(path), device=ctx.device, batch_size=b,
                        dtype=getattr(torch, ctx.run_dtype))
        pipe(texts(64))
        _, secs = _timed(lambda: pipe(texts(n)), ctx.device)
        best = max(best, n / secs)
    ctx.add("encoder_speed", "text-classification pipeline, best batch", f"{best:.0f} rows/s", None,
            f"rayinfer {ours / best:.2f}x")
    try:
        from rayinfer_tasks.embed import EmbedTask
        from sentence_transformers import SentenceTransformer, models

        folder = ctx.out / "models" / "bert-base-st"
        if not folder.exists():
            word = models.Transformer(str(path))
            SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")],
                                device="cpu").save(str(folder))
        run = runner_of(EmbedTask, folder, {}, ctx, ctx.run_dtype)
        run({"text": texts(64)})
        _, secs = _timed(lambda: run({"text": texts(n)}), ctx.device)
        ctx.add("encoder_speed", "rayinfer embed (mean pooling)", f"{n / secs:.0f} rows/s")
        st = SentenceTransformer(str(folder), device=ctx.device, model_kwargs={"dtype": getattr(torch, ctx.run_dtype)})
        st.encode(texts(64))
        peer = 0.0
        for b in ctx.size((64, 256), (32,)):
            _, s2 = _timed(lambda: st.encode(texts(n), batch_size=b), ctx.device)
            peer = max(peer, n / s2)
        ctx.add("encoder_speed", "SentenceTransformer.encode, best batch", f"{peer:.0f} rows/s", None,
                f"rayinfer {(n / secs) / peer:.2f}x")
    except Exception as exc:
        ctx.add("encoder_speed", "embed", "could not run", False, f"{type(exc).__name__}: {str(exc)[:200]}")


def shared_gpu(ctx: Context) -> None:
    """Two processes on one GPU (two actors at num_gpus: 0.5): their rows/s together against one alone."""
    build(ctx, "bert-base")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", str(ctx.out), "--worker", "classify"]
    cmd += ["--dry-run"] if ctx.dry else []

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def rate(p: subprocess.Popen) -> float:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(err[-500:])
        return json.loads(out.strip().splitlines()[-1])["rows_per_s"]

    one = rate(start())
    two = sum(rate(p) for p in [start(), start()])
    ctx.add("shared_gpu", "classify rows/s: one process alone; two sharing the device", f"{one:.0f}; {two:.0f}", None,
            f"together {two / one:.2f}x one")


def worker(kind: str, out: Path, device: str, dry: bool) -> int:
    """A process of ``shared_gpu``: the classify workload, its rows/s as JSON on the last line."""
    import torch

    from benchmarks.gpu_check import Report

    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(0.5)
    else:  # a dry run: half the cores each, as two 0.5-CPU actors would have
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    ctx = Context(out, device, dry, Report(out / f"worker-{os.getpid()}", {}))
    path = out / "models" / "bert-base-float32"
    print(json.dumps({"rows_per_s": classify_rate(path, ctx, ctx.size(8192, 128))}))
    return 0
