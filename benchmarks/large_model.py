"""A model of the size users run, as a user runs it: the memory `validate` states against the actor's
measured peak, the pool memory allows, and the load's peak against transformers' own.

    python -m benchmarks.large_model                   # 2.84B Llama shape, 6 bf16 shards (5.7 GB): ~10 min, 24 GB
    python -m benchmarks.large_model --keep /tmp/big   # build the model there (or reuse it when it is there)
    python -m benchmarks.large_model --no-one-actor    # leave out the one-actor run the default one is compared with

The model (``rayinfer.testing.build_llama_shards``): hidden 3072, 26 layers, MLP 8192, 24 heads
with 8 key-value heads, vocabulary 36,352, untied: 2.84B parameters with random weights, saved in
bf16 as 6 safetensors shards. The job: ``task: perplexity`` on 16 English paragraphs (about the
perplexity task's 2,048-token pass budget on a CPU, so the actor's working memory is used as
`validate` counts it), the defaults (fp32 on a CPU, one actor per CPU where memory allows).

  validate      ``rayinfer validate``: the actor's host memory it states
  run           ``rayinfer run`` of the job with the defaults, in its own process: wall seconds, the
                actors that computed rows, worker deaths, the actor's peak RSS (the manifest's
                ``actor_peak_rss_mb``), and whether Ray's memory monitor said it killed anything
  one actor     the same job with ``runtime.actors: 1``: the time the default run is compared with
  transformers  ``AutoModelForCausalLM.from_pretrained(dtype=float32)`` alone in a fresh process:
                its peak RSS over the process's before it, beside rayinfer's load's, measured the
                same way (the load's peak, not the run's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = {"hidden_size": 3072, "layers": 26, "intermediate_size": 8192, "vocab_size": 36352}
LOAD_PEAK = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from rayinfer.models.load import LoadContext, load_model

def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t = __import__("time").perf_counter()
if sys.argv[2] == "rayinfer":
    model = load_model(LoadContext(model=sys.argv[1], dtype="float32", device="cpu"), AutoModelForCausalLM)
else:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(json.dumps({"before": before, "peak": rss("VmHWM"), "s": __import__("time").perf_counter() - t,
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def cpu() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return f"{name}, {os.cpu_count()} CPUs ({', '.join(extras) or 'no AVX-512'})"


def rayinfer(*args: str, env: dict[str, str] | None = None) -> tuple[float, str, int]:
    t = time.perf_counter()
    ran = subprocess.run([sys.executable, "-m", "rayinfer", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return time.perf_counter() - t, ran.stdout + ran.stderr, ran.returncode


def job(folder: Path, model: Path, name: str, runtime: dict[str, Any]) -> Path:
    import yaml

    spec = {"task": "perplexity", "model": str(model), "input": {"path": str(folder / "in")},
            "output": {"path": str(folder / name), "mode": "overwrite"}, "runtime": runtime}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load_peak(model: Path, how: str) -> dict[str, Any]:
    ran = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(model), how], capture_output=True, text=True)
    if ran.returncode:
        raise SystemExit(f"the {how} load failed: {ran.stderr[-2000:]}")
    return json.loads(ran.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="build the model in this folder, or reuse it if it is there")
    parser.add_argument("--no-one-actor", action="store_true")
    args = parser.parse_args()
    from rayinfer.models.memory import checkpoint_weights
    from rayinfer.models.reads import read_plan
    from rayinfer.testing import build_llama_shards, english_paragraphs, write_dataset

    with tempfile.TemporaryDirectory(prefix="rayinfer-large-") as tmp:
        folder = Path(tmp)
        model = args.keep or folder / "model"
        built = 0.0
        if not (model / "config.json").is_file():
            t = time.perf_counter()
            build_llama_shards(model, SHAPE["hidden_size"], SHAPE["layers"], SHAPE["intermediate_size"],
                               SHAPE["vocab_size"], shard_size="1GB")  # 5.7 GB: 6 shards
            built = time.perf_counter() - t
        weights = checkpoint_weights(model)
        texts = [p[:400] for p in english_paragraphs() if len(p) >= 400][:16]  # ~2,000 tokens
        write_dataset(folder / "in", {"id": list(range(16)), "text": texts})

        _, said, code = rayinfer("validate", str(job(folder, model, "default", {})))
        stated = next((ln for ln in said.splitlines() if ln.startswith("ok: memory")), said.strip()[-300:])
        runs = {"default": {}} if args.no_one_actor else {"default": {}, "one actor": {"actors": 1}}
        results = {}
        for name, runtime in runs.items():
            seconds, out, code = rayinfer("run", str(job(folder, model, name.replace(" ", "-"), runtime)), "--quiet")
            if code:
                raise SystemExit(f"the {name} run failed ({code}): {out[-3000:]}")
            manifest = json.loads((folder / name.replace(" ", "-") / "_manifest.json").read_text())
            results[name] = (seconds, out, manifest)
        ours, theirs = load_peak(model, "rayinfer"), load_peak(model, "transformers")

    need = results["default"][2]["actor_memory_need"]["cpu"]
    print(f"{cpu()}; {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    print(f"model: {weights.params / 1e9:.2f}B parameters, {weights.how}, {weights.stored_bytes / 1e9:.2f} GB on disk "
          f"(bf16){f', built in {built:.0f} s' if built else ''}")
    print(f"validate: {stated}")
    print(f"the job's tokens: {results['default'][2]['tokens']}; the load reads the shards by plan "
          f"{read_plan(model, 'float32')!r} (rayinfer.models.reads)\n")
    print("| run | wall s | actors that computed rows | worker deaths | actor peak RSS | validate's need / peak "
          "| peak / fp32 weights | Ray memory-pressure text |")
    print("|---|---|---|---|---|---|---|---|")
    fp32 = 4 * weights.params
    for name, (seconds, out, manifest) in results.items():
        peak = max(manifest["actor_peak_rss_mb"].values()) * 1e6
        ray_text = "yes" if "memory pressure" in out or "low on memory" in out else "none"
        print(f"| {name} | {seconds:.1f} | {len(manifest['actors'])} | {manifest['worker_deaths']} | "
              f"{peak / 1e9:.2f} GB | {need['host_mb'] * 1e6 / peak:.3f} | {peak / fp32:.3f} | {ray_text} |")
    if "one actor" in results:
        print(f"\ndefault / one actor, wall: {results['default'][0] / results['one actor'][0]:.2f}")
    print("\n| load alone, fp32, fresh process | s | peak RSS over the process's before | peak over / fp32 weights |")
    print("|---|---|---|---|")
    for name, r in (("rayinfer (load_model)", ours), ("transformers from_pretrained", theirs)):
        print(f"| {name} | {r['s']:.1f} | {(r['peak'] - r['before']) / 1e9:.2f} GB | "
              f"{(r['peak'] - r['before']) / r['weights']:.3f} |")


if __name__ == "__main__":
    main()
