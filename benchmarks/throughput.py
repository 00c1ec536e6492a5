"""Throughput: rayinfer against the transformers pipeline and the plain Ray Data recipe.

    python -m benchmarks.throughput                  # all four tasks (about 45 minutes on 2 cores)
    python -m benchmarks.throughput --tasks classify,fill-mask --rows 1000
    python -m benchmarks.throughput --tasks generate,summarize --repeat 1   # generation rows (~25 min)
    python -m benchmarks.throughput --device cuda --rows 20000 --gen-rows 512   # one GPU

For each task, in ONE run, on the same model and the same real, mixed-length text:

  (a) ``transformers.pipeline(...)`` in one process, at each candidate batch size (the best one
      is reported; it also sets (b)'s batch size);
  (b) the plain Ray Data recipe: ``read_parquet -> map_batches(<class wrapping the pipeline>,
      ActorPoolStrategy) -> write_parquet``;
  (c) rayinfer (``run_job``), same actor count and CPUs as (b).

Speed is steady-state, start-up and model loading excluded: for (a), all rows over the pipeline
call (the model is loaded before the clock starts); for (c), all rows from the moment the actor
had loaded its model (``actor_ready_s`` in rayinfer's manifest) to the last part's commit; for
(b), which reports no such moment, the rows of every output file after the first over the time
between the first and the last file's commit. (a) at its best batch size and (c) are run
``--repeat`` times, alternating, and the medians reported. End-to-end seconds, start-up
included, are printed beside them. (c) runs with rayinfer's defaults (``runtime.batch_size``,
``max_batch_tokens``), as a user would. Model FLOP/s
count 2 x non-embedding parameters per real (unpadded) token plus attention, and are compared
with the machine's matmul FLOP/s measured in the same run with the same thread count. Peak memory
is the model process's peak RSS ((a): the pipeline process; (b), (c): the actor process).

``--device cuda`` runs all three on one GPU in bfloat16 (the pipeline with ``dtype=bfloat16``,
the recipe's and rayinfer's actor with ``num_gpus: 1``, rayinfer at its GPU token budget) and
gives the pipeline GPU batch sizes; matmul FLOP/s are then measured in bfloat16 on the GPU.

Generation (generate, summarize) runs benchmarks/generation.py's workloads at their real size
(``--gen-rows`` varied chat prompts x 128 new tokens; as many Python-docs texts of 300-600 tokens
x 64), greedy, and adds the plain ``model.generate`` loop at its best batch (16, 32, 48; on a GPU
64-256) and, with ``--device cuda``, transformers' continuous batching (``generate_batch``, paged
attention) as peers; its table gives new tokens/s (the loop's count of new tokens: greedy
decoding gives every peer the same tokens) and rayinfer's model FLOP/s as a share of matmul's.
rayinfer runs a generation task with no ``runtime`` keys on CPUs (its decoding actor takes the
node's CPUs, as the loop does).

Models: all-MiniLM-L6-v2 (a real 6-layer BERT encoder) with a classification head and with its
MLM head (heads freshly initialised: speed does not depend on their values), as itself for embed
(its sentence-transformers folder; the peer (a) is ``SentenceTransformer.encode``, which sorts by
length itself, at each candidate batch size), and SmolLM2-135M-Instruct for generate and
summarize; all from the offline catalog. Text: sentences and topics of
the Python reference documentation (``pydoc_data.topics``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

THREADS = 2  # torch intra-op threads for every variant (this machine has 2 cores)
ACTOR_CPUS = 1.5  # what (b) and (c) reserve per actor; the rest is left to Ray Data's read tasks

# On CPUs generation gets faster with larger batches (a decode step costs about the same for 8
# rows as for 64), so the pipeline is given large candidates too.
CANDIDATE_BATCHES = {"classify": [8, 16, 32, 64], "fill-mask": [8, 16, 32, 64], "embed": [16, 32, 64, 128],
                     "generate": [16, 32, 48],
                     "summarize": [16, 32, 48]}
GPU_CANDIDATE_BATCHES = {"classify": [64, 128, 256, 512], "fill-mask": [64, 128, 256, 512], "embed": [64, 128, 256, 512],
                         "generate": [32, 64, 128, 256], "summarize": [16, 32, 64, 128]}


def cuda() -> bool:
    return ARGS.device == "cuda"


def candidates(task: str) -> list[int]:
    return (GPU_CANDIDATE_BATCHES if cuda() else CANDIDATE_BATCHES)[task]


# ---- models and data --------------------------------------------------------------------------

def bench_home() -> Path:
    from rayinfer.models import catalog

    return catalog.home() / "bench"


def encoder_with_head(kind: str) -> Path:
    """all-MiniLM-L6-v2's real encoder under a classification or MLM head, saved once."""
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification

    from rayinfer.models import catalog

    dest = bench_home() / f"minilm-{kind}"
    if (dest / "config.json").is_file():
        return dest
    src = catalog.fetch("all-minilm-l6-v2")
    cls = BertForSequenceClassification if kind == "cls" else BertForMaskedLM
    extra = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}} if kind == "cls" else {}
    model = cls.from_pretrained(src, **extra)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def sentences(n: int) -> list[str]:
    from rayinfer.testing import english_sentences

    sents = list(english_sentences())
    return [sents[i % len(sents)] for i in range(n)]


def paragraphs(n: int) -> list[str]:
    """Documents as a retrieval corpus has them: prose paragraphs (60-2,000 characters; all-MiniLM
    cuts the longest at its 256 tokens)."""
    from rayinfer.testing import english_paragraphs

    paras = list(english_paragraphs())
    return [paras[i % len(paras)] for i in range(n)]


def masked(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        words = t.split()
        words[len(words) // 2] = "[MASK]"
        out.append(" ".join(words))
    return out


def workloads(rows: int, gen_rows: int) -> dict[str, dict[str, Any]]:
    """The generation rows are benchmarks/generation.py's workloads at their real size: varied chat
    prompts with 128 new tokens, Python-docs texts of 300-600 tokens summarized in 64."""
    from benchmarks import generation
    from rayinfer.models import catalog

    smol = str(catalog.fetch("smollm2-135m-instruct"))
    return {
        "classify": {"model": str(encoder_with_head("cls")), "column": "text", "texts": sentences(rows),
                     "options": {}, "pipeline": ("text-classification", {"top_k": None})},
        "fill-mask": {"model": str(encoder_with_head("mlm")), "column": "text", "texts": masked(sentences(rows)),
                      "options": {"top_k": 3}, "pipeline": ("fill-mask", {"top_k": 3})},
        # the peer is SentenceTransformer.encode (it sorts by length itself), not a pipeline
        "embed": {"model": str(catalog.fetch("all-minilm-l6-v2")), "column": "text", "texts": paragraphs(rows),
                  "task": "embed", "options": {}, "pipeline": ("sentence-transformers", {}), "max_tokens": 256},
        "generate": {"model": smol, "column": "prompt", "texts": generation.chat_prompts(gen_rows), "task": "generate",
                     "options": {"chat": True, "max_new_tokens": 128},
                     "pipeline": ("text-generation", {"max_new_tokens": 128, "do_sample": False, "return_full_text": False})},
        "summarize": {"model": smol, "column": "text", "texts": generation.summarize_texts(smol, gen_rows),
                      "task": "summarize", "options": {"max_new_tokens": 64, "chat": True},
                      "pipeline": ("text-generation", {"max_new_tokens": 64, "do_sample": False, "return_full_text": False})},
    }


GENERATION = ("generate", "summarize")


def pipeline_inputs(task: str, work: dict[str, Any]) -> list[Any]:
    """What (a) and (b) feed the pipeline: chat messages, for summarize with the prompt rayinfer builds."""
    if task not in GENERATION:
        return work["texts"]
    from rayinfer_tasks.summarize import DEFAULT_INSTRUCTION

    texts = [DEFAULT_INSTRUCTION.replace("{text}", t) for t in work["texts"]] if task == "summarize" else work["texts"]
    return [[{"role": "user", "content": t}] for t in texts]


# ---- measurements -----------------------------------------------------------------------------

def matmul_flops(threads: int = THREADS, n: int = 1024, seconds: float = 3.0) -> float:
    """The machine's matmul FLOP/s: fp32 on the CPU threads, or bfloat16 on the GPU."""
    import torch

    torch.set_num_threads(threads)
    if cuda():
        n = 8192
    kwargs = {"device": "cuda", "dtype": torch.bfloat16} if cuda() else {}
    a, b = torch.randn(n, n, **kwargs), torch.randn(n, n, **kwargs)
    for _ in range(3):
        a @ b
    if cuda():
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if cuda():
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def model_flops(model_dir: str, texts: list[str], max_tokens: int = 512) -> tuple[int, float]:
    """(real input tokens, forward FLOPs over them): 2 x non-embedding params per token + attention."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    lengths = [min(len(ids), max_tokens) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * h)
    per_layer = 4 * h * h + (3 if cfg.model_type == "llama" else 2) * h * inter  # attention + MLP weights
    params = layers * per_layer
    flops = sum(2 * params * n + 4 * layers * h * n * n for n in lengths)
    return sum(lengths), flops


class Watcher:
    """Samples the peak RSS of Ray's map workers (the model processes of (b) and (c))."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    if "MapWorker" in " ".join(p.cmdline()):
                        self.peak_mb = max(self.peak_mb, p.memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            time.sleep(0.5)


def make_pipeline(kind: str, model: str, device: str) -> Any:
    """(a)'s and (b)'s model: a transformers pipeline, or for embed a SentenceTransformer whose
    ``encode`` is called the way a pipeline is (texts, batch_size)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else None
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device=device, model_kwargs={"dtype": dtype} if dtype else None)
        return lambda texts, batch_size, **kw: list(st.encode(texts, batch_size=batch_size, **kw))
    from transformers import pipeline

    pipe = pipeline(kind, model=model, device=device, dtype=dtype)
    if pipe.tokenizer.pad_token_id is None:
        pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
    if kind == "text-generation":
        pipe.tokenizer.padding_side = "left"
    return pipe


class PipelineRecipe:
    """(b): the class a Ray Data user writes around a transformers pipeline."""

    def __init__(self, task: str, model: str, kwargs: dict[str, Any], batch_size: int, column: str, chat: bool,
                 device: str = "cpu"):
        import torch

        torch.set_num_threads(THREADS)
        self.pipe = make_pipeline(task, model, device)
        self.kwargs, self.batch_size, self.column, self.chat = kwargs, batch_size, column, chat

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = list(batch[self.column])
        if self.chat:
            texts = [[{"role": "user", "content": t}] for t in texts]
        out = self.pipe(texts, batch_size=self.batch_size, **self.kwargs)
        return {"id": batch["id"], "out": [json.dumps(o, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)) for o in out]}


def run_pipeline(task: str, work: dict[str, Any], batch_size: int) -> dict[str, float]:
    """(a) in a fresh subprocess, so its peak RSS is its own."""
    code = (
        "import json,sys,time,resource,torch\n"
        "from transformers import pipeline\n"
        "from benchmarks.throughput import workloads, pipeline_inputs, make_pipeline, THREADS\n"
        "task, bs, rows, gen, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]\n"
        "torch.set_num_threads(THREADS)\n"
        "w = workloads(rows, gen)[task]\n"
        "t0 = time.perf_counter()\n"
        "pipe = make_pipeline(w['pipeline'][0], w['model'], dev)\n"
        "inputs = pipeline_inputs(task, w)\n"
        "t1 = time.perf_counter()\n"
        "with torch.inference_mode(): out = pipe(inputs, batch_size=bs, **w['pipeline'][1])\n"
        "if dev == 'cuda': torch.cuda.synchronize()\n"
        "t2 = time.perf_counter()\n"
        "assert len(out) == len(inputs)\n"
        "print(json.dumps({'steady_s': t2 - t1, 'total_s': t2 - t0, 'rows': len(inputs),"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, task, str(batch_size), str(ARGS.rows), str(ARGS.gen_rows), ARGS.device],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def steady(out: Path, t_start: float, t_end: float) -> tuple[float, int]:
    """Rows per second between the first and the last output file's commit (start-up and
    teardown excluded): (seconds, rows) over that span."""
    files = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(files) < 2:  # everything came in one file: no steady part to measure
        return t_end - t_start, sum(pq.read_metadata(f).num_rows for f in files)
    span = files[-1].stat().st_mtime - files[0].stat().st_mtime
    return span, sum(pq.read_metadata(f).num_rows for f in files[1:])


def run_ray_recipe(task: str, work: dict[str, Any], data: Path, out: Path, batch_size: int) -> dict[str, float]:
    import ray

    kind, kwargs = work["pipeline"]
    chat = task in GENERATION
    if task == "summarize":
        from rayinfer_tasks.summarize import DEFAULT_INSTRUCTION

        table = pq.read_table(data)
        texts = [DEFAULT_INSTRUCTION.replace("{text}", t) for t in table.column(work["column"]).to_pylist()]
        data = data.parent / "recipe-input"
        data.mkdir(exist_ok=True)
        pq.write_table(table.set_column(table.schema.get_field_index(work["column"]), work["column"], pa.array(texts)),
                       data / "part.parquet")
    t0 = time.perf_counter()
    with Watcher() as watcher:
        ds = ray.data.read_parquet(str(data))
        ds = ds.map_batches(
            PipelineRecipe,
            fn_constructor_kwargs=dict(task=kind, model=work["model"], kwargs=kwargs, batch_size=batch_size,
                                       column=work["column"], chat=chat, device=ARGS.device),
            # num_cpus=1, not ACTOR_CPUS: with 1.5 the read tasks (1 CPU each by default) cannot run
            # beside the actor on 2 CPUs and the recipe deadlocks. Its torch threads are set to THREADS.
            batch_size=max(batch_size, 64), compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
            num_gpus=1 if cuda() else None,
        )
        ds.write_parquet(str(out))
        t1 = time.perf_counter()
    rows = pq.read_table(out).num_rows
    secs, steady_rows = steady(out, t0, t1)
    return {"steady_s": secs, "steady_rows": steady_rows, "total_s": t1 - t0, "rows": rows, "peak_mb": watcher.peak_mb}


def run_rayinfer(task: str, work: dict[str, Any], data: Path, out: Path) -> dict[str, float]:
    from datetime import datetime

    from rayinfer.api import run_job

    spec = {
        "task": task,
        "model": work["model"],
        "input": {"path": str(data), "id_column": "id", "columns": {("prompt" if task == "generate" else "text"): work["column"]}},
        "output": {"path": str(out), "mode": "overwrite"},
        "options": work["options"],
        # batch_size, max_batch_tokens and dtype at their defaults: what a user gets (a generation
        # task's CPU actor at its default too: it takes the node's CPUs, as the loop does)
        "runtime": {"num_gpus": 1} if cuda() else {} if task in GENERATION else {"actors": 1, "num_cpus": ACTOR_CPUS},
    }
    t0 = time.perf_counter()
    with Watcher() as watcher:
        manifest = run_job(spec)
        t1 = time.perf_counter()
    # steady state: every row, from the moment the actor had loaded its model (the manifest's
    # actor_ready_s) to the last part's commit; Ray start-up and model loading excluded, like (a)
    started = datetime.fromisoformat(manifest["started_at"]).timestamp()
    ready = started + min(manifest["actor_ready_s"].values())
    last = max(p.stat().st_mtime for p in out.glob("part-*.parquet"))
    secs, steady_rows = last - ready, manifest["rows"]
    peak = max(manifest.get("actor_peak_rss_mb", {}).values(), default=watcher.peak_mb)
    return {"steady_s": secs, "steady_rows": steady_rows, "total_s": t1 - t0, "rows": manifest["rows"],
            "peak_mb": peak, "cold_start_s": manifest["cold_start_s"], "padded_tokens": manifest["padded_tokens"],
            "tokens": manifest["tokens"]}


def median_run(runs: list[dict[str, float]], rows_key: str) -> dict[str, float]:
    """The run with the median rows/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r[rows_key] / r["steady_s"])
    return dict(ordered[(len(ordered) - 1) // 2])


# ---- the run ----------------------------------------------------------------------------------

def main() -> None:
    import ray
    import torch

    tasks = ARGS.tasks.split(",")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if cuda() else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, "
          f"torch {torch.__version__}, threads {THREADS}", flush=True)
    if cuda() and not torch.cuda.is_available():
        sys.exit(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    peak = matmul_flops()
    kind = "bf16 on the GPU" if cuda() else f"fp32, {THREADS} threads"
    print(f"measured matmul: {peak / 1e9:.1f} GFLOP/s ({kind})", flush=True)
    work_all = workloads(ARGS.rows, ARGS.gen_rows)
    tmp = Path(tempfile.mkdtemp(prefix="rayinfer-bench-"))
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if cuda() else 0,
             include_dashboard=False, logging_level="ERROR", _temp_dir=str(tmp / "ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: list[Any] = []
    generation_rows: list[dict[str, Any]] = []
    try:
        for task in tasks:
            work = work_all[task]
            data = tmp / task / "in"
            data.mkdir(parents=True)
            pq.write_table(pa.table({"id": list(range(len(work["texts"]))), work["column"]: work["texts"]}),
                           data / "part-0.parquet", row_group_size=256)
            print(f"\n== {task}: {len(work['texts'])} rows, model {Path(work['model']).name}", flush=True)
            best = None
            for bs in candidates(task):
                r = run_pipeline(task, work, bs)
                print(f"  (a) pipeline batch_size={bs}: {r['rows'] / r['steady_s']:.1f} rows/s", flush=True)
                if best is None or r["steady_s"] < best[1]["steady_s"]:
                    best = (bs, r)
            bs, a = best
            b = run_ray_recipe(task, work, data, tmp / task / "out-recipe", bs)
            print(f"  (b) plain Ray recipe: {b['steady_rows'] / b['steady_s']:.1f} rows/s", flush=True)
            a_runs, c_runs = [a], []
            for i in range(ARGS.repeat):
                if i:  # (a) at its best batch size again, alternating with (c): drift hits both
                    a_runs.append(run_pipeline(task, work, bs))
                    print(f"  (a) pipeline batch_size={bs}: {a_runs[-1]['rows'] / a_runs[-1]['steady_s']:.1f} rows/s", flush=True)
                c_runs.append(run_rayinfer(task, work, data, tmp / task / "out-rayinfer"))
                print(f"  (c) rayinfer: {c_runs[-1]['steady_rows'] / c_runs[-1]['steady_s']:.1f} rows/s", flush=True)
            a = median_run(a_runs, "rows")
            c = median_run(c_runs, "steady_rows")
            c["ratios"] = sorted((cr["steady_rows"] / cr["steady_s"]) / (ar["rows"] / ar["steady_s"]) for ar, cr in zip(a_runs, c_runs))
            if task in GENERATION:
                generation_rows.append(generation_peers(task, work, bs, a, b, c, tmp / task, peak))
                continue
            tokens, flops = model_flops(work["model"], work["texts"], work.get("max_tokens", 512))
            results.append((task, bs, a, b, c, tokens, flops, len(work["texts"])))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    if generation_rows:
        print_generation(generation_rows)
    if not results:
        return
    print("\n| task | rows | (a) pipeline rows/s (best batch) | (b) Ray recipe rows/s | (c) rayinfer rows/s "
          "| c/a | c/b | (c) tokens/s | (c) model FLOP/s vs matmul | end-to-end s (a / b / c) | peak MB (a / b / c) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task, bs, a, b, c, tokens, flops, rows in results:
        ra = a["rows"] / a["steady_s"]
        rb = b["steady_rows"] / b["steady_s"]
        rc = c["steady_rows"] / c["steady_s"]
        tok_s = tokens / rows * rc
        fl = f"{flops / rows * rc / 1e9:.1f} G ({flops / rows * rc / peak:.0%})"
        print(f"| {task} | {rows} | {ra:.1f} ({bs}) | {rb:.1f} | {rc:.1f} | {rc / ra:.2f} | {rc / rb:.2f} | "
              f"{tok_s:.0f} | {fl} | {a['total_s']:.0f} / {b['total_s']:.0f} / {c['total_s']:.0f} | "
              f"{a['peak_mb']:.0f} / {b['peak_mb']:.0f} / {c['peak_mb']:.0f} |")
    if ARGS.repeat > 1:
        print(f"\nrows/s are medians of {ARGS.repeat} runs of (a) at its best batch size and of (c), alternating; "
              "c/a of each pair: " + "; ".join(f"{r[0]} " + ", ".join(f"{x:.2f}" for x in r[4]["ratios"]) for r in results))
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s; rayinfer cold start (run to first committed part): "
          + ", ".join(f"{r[0]} {r[4]['cold_start_s']:.1f}s" for r in results))
    print("rayinfer padding: " + ", ".join(
        f"{r[0]} {r[4]['padded_tokens'] / max(1, r[4]['tokens']):.2f}x real tokens" for r in results if r[4]["tokens"]))


def generation_peers(task: str, work: dict[str, Any], bs: int, a: dict[str, Any], b: dict[str, Any], c: dict[str, Any],
                     tmp: Path, peak: float) -> dict[str, Any]:
    """A generation task's other peers, same run: the plain ``generate`` loop at its best batch
    (benchmarks/generation.py's) and, on a GPU, transformers' continuous batching
    (``generate_batch``); every rate as new tokens/s (the loop's count: greedy, the same tokens)."""
    from benchmarks import generation

    ids = generation.encoded(work["model"], {"task": work["task"], "texts": work["texts"]})
    new = work["options"]["max_new_tokens"]
    loops = {}
    for batch in candidates(task):
        loops[batch] = generation.run_loop(work["model"], ids, batch, new, tmp, ARGS.device)
        print(f"  loop batch={batch}: {loops[batch]['new_tokens'] / loops[batch]['seconds']:.1f} new tokens/s", flush=True)
    best = max(loops, key=lambda k: loops[k]["new_tokens"] / loops[k]["seconds"])
    tokens = loops[best]["new_tokens"]
    row = {"task": task, "rows": len(ids), "new": new, "tokens": tokens, "pipeline_batch": bs, "loop_batch": best,
           "pipeline": tokens / len(ids) * a["rows"] / a["steady_s"], "loop": tokens / loops[best]["seconds"],
           "recipe": tokens / len(ids) * b["steady_rows"] / b["steady_s"],
           "rayinfer": tokens / len(ids) * c["steady_rows"] / c["steady_s"], "continuous": None}
    if cuda():
        cb = generation.run_continuous(work["model"], ids, new, tmp, ARGS.device)
        row["continuous"] = tokens / cb["seconds"]
        print(f"  transformers generate_batch: {row['continuous']:.1f} new tokens/s", flush=True)
    row["matmul_share"] = generation.model_flops(work["model"], ids, tokens) / tokens * row["rayinfer"] / peak
    return row


def print_generation(rows: list[dict[str, Any]]) -> None:
    print("\n| task | rows | max new | (a) pipeline new tok/s (batch) | loop new tok/s (batch) | "
          "transformers continuous | (b) Ray recipe | (c) rayinfer | c/a | c/loop | (c) % of matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cont = f"{r['continuous']:.1f}" if r["continuous"] else "(GPU only)"
        print(f"| {r['task']} | {r['rows']} | {r['new']} | {r['pipeline']:.1f} ({r['pipeline_batch']}) | "
              f"{r['loop']:.1f} ({r['loop_batch']}) | {cont} | {r['recipe']:.1f} | {r['rayinfer']:.1f} | "
              f"{r['rayinfer'] / r['pipeline']:.2f} | {r['rayinfer'] / r['loop']:.2f} | {r['matmul_share']:.0%} |")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="classify,fill-mask,embed,generate,summarize")
    ap.add_argument("--rows", type=int, default=1500, help="rows for classify, fill-mask and embed")
    ap.add_argument("--gen-rows", type=int, default=48, help="rows for generate and summarize")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a) at its best batch size and of (c); medians reported")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU, bfloat16")
    return ap.parse_args(argv)


ARGS = parse([])

if __name__ == "__main__":
    ARGS = parse()
    main()
