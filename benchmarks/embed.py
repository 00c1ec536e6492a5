"""embed's levers, no Ray, one process, one run: rayinfer's task runner against
``SentenceTransformer.encode`` at its best batch size, fp32 and bfloat16, and on ONNX Runtime
(``runtime.engine: onnxruntime``: the transformer exported once, then run by onnxruntime with the
same 2 threads; the export is not timed, as a job reads it from rayinfer's cache after the first).
``SentenceTransformer(backend="onnx")`` is not measured: it needs optimum-onnx, whose 0.1.0 pins
transformers<5 (installing it here downgraded transformers to 4.57.6, which sentence-transformers
6 and rayinfer cannot run with).

    python -m benchmarks.embed                 # ~4 minutes on 2 cores
    python -m benchmarks.embed --rows 3000 --rounds 3

Both sides get the same model (all-MiniLM-L6-v2 from the catalog, its sentence-transformers
folder), the same texts (prose paragraphs of the Python reference documentation, 60-2,000
characters, cut at the model's 256 tokens), the same 2 torch threads, and are warmed up first.
Rounds alternate (encode at each candidate batch size, then rayinfer at its default token budget
and at others), so drift on this shared machine hits both; the table gives each round's rows/s
and ratios against that round's best encode. bfloat16 rows report agreement with fp32 encode:
the cosine of each row's vector to the fp32 one (min and mean), since bf16 changes the outputs.
``benchmarks/throughput.py --tasks embed`` measures the same task as a Ray job against encode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

THREADS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budgets", default="512,1024,2048,4096", help="rayinfer's max_batch_tokens to try")
    args = ap.parse_args()

    import numpy as np
    import torch
    from rayinfer_tasks.embed import EmbedTask
    from sentence_transformers import SentenceTransformer

    from rayinfer.models import catalog
    from rayinfer.models.load import LoadContext
    from rayinfer.models.locate import fingerprint_folder, locate_model
    from rayinfer.task.runner import TaskRunner
    from rayinfer.testing import english_paragraphs

    torch.set_num_threads(THREADS)
    model = str(catalog.fetch("all-minilm-l6-v2"))
    paras = list(english_paragraphs())
    texts = [paras[i % len(paras)] for i in range(args.rows)]
    st = SentenceTransformer(model, device="cpu")
    runners = {}
    key = fingerprint_folder(Path(model))
    for name, dtype, engine in (("float32", "float32", "torch"), ("bfloat16", "bfloat16", "torch"),
                                ("onnxruntime", "float32", "onnxruntime")):
        options = EmbedTask.options_for_model(EmbedTask.Options(), locate_model(model))
        task = EmbedTask(options, LoadContext(model=model, dtype=dtype, engine=engine, fingerprint=key,
                                              num_threads=THREADS))
        task.load()
        runners[name] = task
    st.encode(texts[:128], batch_size=32)
    for task in runners.values():
        TaskRunner(task).run({"text": texts[:128]})

    def encode(bs: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = st.encode(texts, batch_size=bs)
        return len(texts) / (time.perf_counter() - t), out

    def ours(dtype: str, budget: int) -> tuple[float, np.ndarray]:
        runner = TaskRunner(runners[dtype], max_batch_tokens=budget)
        t = time.perf_counter()
        vectors = []
        for i in range(0, len(texts), 256):  # an actor's batches (runtime.batch_size 256)
            cols, errors = runner.run({"text": texts[i:i + 256]})
            assert not any(errors)
            vectors += cols["embedding"]
        return len(texts) / (time.perf_counter() - t), np.array(vectors, dtype=np.float32)

    print(f"{args.rows} paragraphs, all-MiniLM-L6-v2, {THREADS} threads, torch {torch.__version__}\n")
    print("| round | peer | rows/s | vs best encode | max abs diff vs fp32 encode | cosine to fp32 (min / mean) |")
    print("|---|---|---|---|---|---|")
    for r in range(args.rounds):
        peers = {f"encode batch_size={bs}": encode(bs) for bs in (16, 32, 64)}
        best_rate, reference = max(peers.values(), key=lambda p: p[0])
        for budget in map(int, args.budgets.split(",")):
            default = " (default)" if budget == EmbedTask.cpu_batch_tokens else ""
            peers[f"rayinfer fp32, max_batch_tokens {budget}{default}"] = ours("float32", budget)
        peers[f"rayinfer bf16 (runtime.dtype: bfloat16), {EmbedTask.cpu_batch_tokens}"] = ours(
            "bfloat16", EmbedTask.cpu_batch_tokens)
        for budget in map(int, args.budgets.split(",")):
            peers[f"rayinfer onnxruntime (runtime.engine), max_batch_tokens {budget}"] = ours("onnxruntime", budget)
        for name, (rate, vectors) in peers.items():
            cos = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
            print(f"| {r + 1} | {name} | {rate:.1f} | {rate / best_rate:.2f} | {np.abs(vectors - reference).max():.1e} "
                  f"| {cos.min():.4f} / {cos.mean():.5f} |", flush=True)


if __name__ == "__main__":
    main()
