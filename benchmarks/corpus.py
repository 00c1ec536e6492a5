"""Large corpora: rayinfer end to end against a plain one-process loop, in the same run.

    python -m benchmarks.corpus                      # 1M rows in 10 files (about 10 minutes on 2 cores)
    python -m benchmarks.corpus --rows 10000000 --repeat 1 --no-loop     # the 10M-row memory run
    python -m benchmarks.corpus --small-files 600 --rows 60000    # 600 shards of 100 rows vs one file

The workload is what a user with a big corpus and a small model meets: short real sentences
(CPython's reference docs, cycled), ``--files`` Parquet files, classified by the tiny 2-layer BERT
of ``rayinfer.testing`` (hidden size 32). With a model this small per-row overhead decides.

  (loop)     one process, 2 torch threads: read each file, tokenize it (fast tokenizer, batched),
             sort by length, cut token-budget batches, run the model, softmax, write one Parquet
             file per input file. What a competent user writes without any framework.
  (rayinfer) ``rayinfer run`` as a subprocess with the spec's defaults: Ray start, actor start,
             model loads, every commit and the manifest are inside the time.

Both are timed end to end (wall clock, start-up included) and alternated ``--repeat`` times; the
table gives each run and the median ratio. ``--small-files N`` instead times rayinfer on the rows
in N Parquet files (a crawl's shards) against the same rows in one file, alternated, end to end. The driver's and the actors' RSS are sampled every 5 s
during each rayinfer run and reported at 10% and at the end of the rows, with rows/s over the
first and the second half (rows done come from rayinfer's own progress lines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

THREADS = 2
LOOP_BATCH_TOKENS = 2048  # the same token budget rayinfer uses for encoders on CPU


def make_corpus(folder: Path, rows: int, files: int) -> None:
    from rayinfer.testing import english_sentences

    sents = pa.array(english_sentences(), pa.string())
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for i in range(files):
        start, stop = i * per, min(rows, (i + 1) * per)
        idx = pa.array([j % len(sents) for j in range(start, stop)], pa.int64())
        table = pa.table({"id": pa.array(range(start, stop), pa.int64()), "text": sents.take(idx)})
        pq.write_table(table, folder / f"corpus-{i:03d}.parquet", row_group_size=100_000)


def run_loop(model: Path, data: Path, out: Path) -> dict[str, float]:
    """(loop) in a fresh subprocess so its start-up (imports, model load) is timed as rayinfer's is."""
    code = f"""
import sys, time
t0 = time.perf_counter()
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq, torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification
torch.set_num_threads({THREADS})
model_dir, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
out.mkdir(parents=True, exist_ok=True)
rows = 0
with torch.inference_mode():
    for f in sorted(data.glob("*.parquet")):
        table = pq.read_table(f, columns=["id", "text"])
        texts = table.column("text").to_pylist()
        ids = tok(texts, truncation=True, max_length=128)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        label, score = [None] * len(ids), [0.0] * len(ids)
        i = 0
        while i < len(order):
            longest = len(ids[order[i]])
            n = max(1, {LOOP_BATCH_TOKENS} // longest)
            chunk = order[i:i + n]
            i += n
            x = torch.zeros((len(chunk), longest), dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for r, j in enumerate(chunk):
                x[r, :len(ids[j])] = torch.tensor(ids[j])
                mask[r, :len(ids[j])] = 1
            probs = model(input_ids=x, attention_mask=mask).logits.softmax(-1)
            best, arg = probs.max(-1)
            for r, j in enumerate(chunk):
                label[j], score[j] = labels[int(arg[r])], float(best[r])
        pq.write_table(pa.table({{"id": table.column("id"), "label": label, "score": score}}), out / f.name)
        rows += len(ids)
print(rows, time.perf_counter() - t0)
"""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(model), str(data), str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    rows = int(res.stdout.split()[0])
    return {"rows": rows, "wall_s": wall}


class RssSampler:
    """Samples the RSS of the rayinfer driver and of its actor processes (command lines naming
    TaskActor) every ``every_s`` seconds, with the rows done so far as rayinfer's own progress
    lines (one every 10 s when stderr is not a terminal) report them."""

    def __init__(self, proc: Any, every_s: float) -> None:
        self.proc, self.every_s = proc, every_s
        self.samples: list[dict[str, Any]] = []
        self.rows = 0
        self.stderr: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]

    def __enter__(self) -> "RssSampler":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            m = re.match(r"rayinfer: (\d+)/(\d+) rows", line)
            if m:
                self.rows = int(m.group(1))

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(self.proc.pid)
        while not self._stop.wait(self.every_s):
            try:
                procs = [me, *me.children(recursive=True)]
                driver_mb = me.memory_info().rss / 2**20
            except psutil.Error:
                return
            actors = []
            for p in procs:
                try:
                    if "TaskActor" in " ".join(p.cmdline()):
                        actors.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            self.samples.append({"t": time.time(), "rows": self.rows, "driver_mb": driver_mb,
                                 "actor_mb": max(actors, default=0.0)})


def run_rayinfer(model: Path, data: Path, out: Path, tmp: Path, extra: list[str]) -> dict[str, Any]:
    spec = {
        "task": "classify",
        "model": str(model),
        "input": {"path": str(data), "id_column": "id"},
        "output": {"path": str(out), "mode": "overwrite"},
    }
    job = tmp / "job.json"
    job.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": str(tmp / "ray")}
    cmd = [sys.executable, "-m", "rayinfer", "run", str(job), *[a for s in extra for a in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with RssSampler(proc, every_s=5.0) as sampler:
        stdout = proc.stdout.read()
        proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError("".join(sampler.stderr)[-3000:] + stdout[-2000:])
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"rows": manifest["rows"], "wall_s": wall, "parts": len(manifest["parts"]), "manifest": manifest,
            "samples": sampler.samples}


def resume_time(model: Path, data: Path, out: Path, tmp: Path) -> float:
    """A --resume of the finished output: reads the footers, finds nothing to do, finishes."""
    spec = {"task": "classify", "model": str(model), "input": {"path": str(data), "id_column": "id"},
            "output": {"path": str(out), "mode": "resume"}}
    job = tmp / "resume.json"
    job.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet"], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def at_fraction(samples: list[dict[str, Any]], rows: int, fraction: float) -> dict[str, Any] | None:
    hits = [s for s in samples if s["rows"] >= rows * fraction]
    return hits[0] if hits else None


def halves(samples: list[dict[str, Any]], rows: int) -> tuple[float, float] | None:
    """rows/s over the first and the second half of the rows, from the sampled progress counts."""
    mid = at_fraction(samples, rows, 0.5)
    first = next((s for s in samples if s["rows"] > 0), None)
    top = max((s["rows"] for s in samples), default=0)
    last = next((s for s in samples if s["rows"] == top), None)
    if not (mid and first and last) or mid is first or mid is last:
        return None
    return ((mid["rows"] - first["rows"]) / (mid["t"] - first["t"]),
            (last["rows"] - mid["rows"]) / (last["t"] - mid["t"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of (loop) and (rayinfer)")
    ap.add_argument("--no-loop", action="store_true", help="rayinfer only (the 10M-row memory run)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="spec overrides for rayinfer")
    ap.add_argument("--small-files", type=int, default=0, metavar="N",
                    help="rayinfer on the rows in N files against the same rows in one file")
    args = ap.parse_args(argv)
    if args.small_files:
        small_files(args)
        return

    from rayinfer.testing import build_bert

    tmp = Path(tempfile.mkdtemp(prefix="rayinfer-corpus-"))
    try:
        model = build_bert(tmp / "model", head="sequence-classification")
        data = tmp / "in"
        make_corpus(data, args.rows, args.files)
        size = sum(p.stat().st_size for p in data.glob("*.parquet")) / 2**20
        print(f"corpus: {args.rows} rows in {args.files} files ({size:.0f} MiB); model: 2-layer BERT, hidden 32; "
              f"{os.cpu_count()} cores", flush=True)
        runs: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
        for i in range(args.repeat):
            loop = None
            if not args.no_loop:
                shutil.rmtree(tmp / "out-loop", ignore_errors=True)
                loop = run_loop(model, data, tmp / "out-loop")
                print(f"  (loop)     {loop['rows'] / loop['wall_s']:8.0f} rows/s  ({loop['wall_s']:.1f} s)", flush=True)
            ri = run_rayinfer(model, data, tmp / "out", tmp, args.overrides)
            print(f"  (rayinfer) {ri['rows'] / ri['wall_s']:8.0f} rows/s  ({ri['wall_s']:.1f} s, {ri['parts']} parts)"
                  + (f"  ratio {(ri['rows'] / ri['wall_s']) / (loop['rows'] / loop['wall_s']):.2f}" if loop else ""),
                  flush=True)
            runs.append((loop, ri))
        resume_s = resume_time(model, data, tmp / "out", tmp)

        print("\n| run | loop rows/s | rayinfer rows/s | ratio | parts | actors (rows each) | padded/real tokens |")
        print("|---|---|---|---|---|---|---|")
        ratios = []
        for i, (loop, ri) in enumerate(runs):
            m = ri["manifest"]
            r_ri = ri["rows"] / ri["wall_s"]
            r_loop = loop["rows"] / loop["wall_s"] if loop else None
            if r_loop:
                ratios.append(r_ri / r_loop)
            print(f"| {i + 1} | {f'{r_loop:.0f}' if r_loop else '-'} | {r_ri:.0f} | "
                  f"{f'{r_ri / r_loop:.2f}' if r_loop else '-'} | {ri['parts']} | "
                  f"{len(m['actors'])} ({', '.join(str(v) for v in m['actors'].values())}) | "
                  f"{m['padded_tokens'] / max(1, m['tokens']):.2f} |")
        if ratios:
            print(f"\nmedian rayinfer/loop ratio: {sorted(ratios)[(len(ratios) - 1) // 2]:.2f} (end to end, start-up included)")
        print(f"resume of the complete output (reads every footer, nothing to do): {resume_s:.1f} s")
        for i, (_, ri) in enumerate(runs):
            s, rows = ri["samples"], ri["rows"]
            early = at_fraction(s, rows, 0.1)
            late = next((x for x in reversed(s) if x["actor_mb"] > 0), None)  # the last sample with actors up
            if early and late:
                print(f"run {i + 1} RSS at {early['rows']} rows: driver {early['driver_mb']:.0f} MB, actor "
                      f"{early['actor_mb']:.0f} MB; at {late['rows']} rows: driver {late['driver_mb']:.0f} MB, "
                      f"actor {late['actor_mb']:.0f} MB ({late['actor_mb'] / max(1, early['actor_mb']) - 1:+.0%})")
            h = halves(s, rows)
            if h:
                print(f"run {i + 1} rows/s first half {h[0]:.0f}, second half {h[1]:.0f} ({h[1] / h[0] - 1:+.0%})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def small_files(args: argparse.Namespace) -> None:
    """The same rows as one file and as ``--small-files`` files, each run by rayinfer end to end
    (start-up included), alternated ``--repeat`` times; the table gives wall seconds, parts and
    the median ratio of the many files' time to the one file's."""
    from rayinfer.testing import build_bert

    tmp = Path(tempfile.mkdtemp(prefix="rayinfer-small-files-"))
    try:
        model = build_bert(tmp / "model", head="sequence-classification")
        one, many = tmp / "one", tmp / "many"
        make_corpus(one, args.rows, 1)
        make_corpus(many, args.rows, args.small_files)
        print(f"corpus: {args.rows} rows as 1 file and as {args.small_files} files; model: 2-layer BERT, hidden 32; "
              f"{os.cpu_count()} cores", flush=True)
        print("\n| run | input | parts | wall s | rows/s |\n|---|---|---|---|---|", flush=True)
        ratios = []
        for i in range(args.repeat):
            times = {}
            for name, data in (("1 file", one), (f"{args.small_files} files", many)):
                ri = run_rayinfer(model, data, tmp / "out", tmp, args.overrides)
                times[name] = ri["wall_s"]
                print(f"| {i + 1} | {name} | {ri['parts']} | {ri['wall_s']:.1f} | {ri['rows'] / ri['wall_s']:.0f} |",
                      flush=True)
            ratios.append(times[f"{args.small_files} files"] / times["1 file"])
        print(f"\n{args.small_files} files / 1 file, wall time: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {sorted(ratios)[(len(ratios) - 1) // 2]:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
