"""The one-script GPU check (#39): what rayinfer does on a GPU, proven in one run, with no Ray and no
network (the GPU machine has neither).

    python -m benchmarks.gpu_check OUT               # on a GPU: every section, about 8 minutes on one H100
    python -m benchmarks.gpu_check OUT --dry-run     # every section at toy size on the CPU (under 2 minutes)
    python -m benchmarks.gpu_check OUT --sections parity,decode_speed

Models are built from the configs in ``benchmarks/gpu_models`` with seeded random weights (a
SmolLM2-135M shape, a ~1B Llama shape, a BERT-base shape; the tokenizers are there too), so the
repository alone carries the check to a machine. The tasks run through rayinfer's own code path
without Ray (``rayinfer.testing.run_task``: the runner, the decode loop, the sampling), against
the peers at their best settings in the same run. Each section is time-boxed; results are written
to OUT as they come (``results.json``, and the table as ``results.md``), so a run cut short still
leaves what it measured. The machine this is written for has Python 3.12, torch, transformers,
peft, accelerate, pyarrow, pluggy, click and sentence-transformers, and no pydantic or llguidance:
``benchmarks/gpu_wheels.txt`` lists the wheels to carry over (and the command that downloads them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "benchmarks" / "gpu_models"


class Report:
    """Rows of (section, check, value, ok, note), written to OUT after every row."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.rows = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, check: str, value: Any, ok: bool | None = None, note: str = "") -> None:
        row = {"section": section, "check": check, "value": value, "ok": ok, "note": note}
        self.rows.append(row)
        print(f"[{section}] {check}: {value}" + ("" if ok is None else " ok" if ok else " FAILED") + (f" ({note})" if note else ""),
              flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps({**self.meta, "rows": self.rows}, indent=2, default=str))
        lines = [f"# rayinfer GPU check: {self.meta.get('device_name', '?')}", "",
                 " ".join(f"{k}={v}" for k, v in self.meta.items() if k != "device_name"), "",
                 "| section | check | value | ok | note |", "|---|---|---|---|---|"]
        for r in self.rows:
            ok = "" if r["ok"] is None else "yes" if r["ok"] else "**NO**"
            lines.append(f"| {r['section']} | {r['check']} | {r['value']} | {ok} | {r['note']} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["ok"] is False]


class OutOfTime(Exception):
    pass


@contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise OutOfTime in the main thread after ``seconds`` (a section that runs long ends there)."""
    def expire(*_: Any) -> None:
        raise OutOfTime(f"over its {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    meta = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported())
    else:
        meta["device_name"] = f"CPU ({os.cpu_count()} cores)"
    return meta


def all_sections() -> dict[str, tuple[Callable[[Any], None], float]]:
    """Each section and its share of the run's time, in the order they run."""
    from benchmarks import gpu_sections as s
    from benchmarks import gpu_speed as speed

    return {
        "parity": (s.parity, 0.08), "bf16": (s.bf16, 0.08), "seeded": (s.seeded, 0.12),
        "constraints": (s.constraints, 0.06), "encoders": (s.encoders, 0.05), "host_reads": (s.host_reads, 0.06),
        "decode_speed": (speed.decode_speed, 0.4), "encoder_speed": (speed.encoder_speed, 0.12),
        "shared_gpu": (speed.shared_gpu, 0.1),
        "split": (s.split, 0.05),
        "engine_transformers": (s.engine_transformers, 0.06),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks import gpu_sections
    from benchmarks.gpu_speed import worker

    sections = all_sections()

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="Folder for results.json, results.md and the built models.")
    parser.add_argument("--dry-run", action="store_true", help="Every section at toy size on the CPU.")
    parser.add_argument("--sections", default="", help=f"Comma-separated, of: {', '.join(sections)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="The whole run's time (sections share it).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a process of the shared-GPU section
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.worker:
        return worker(args.worker, args.out, device, args.dry_run)
    if device == "cpu" and not args.dry_run:
        print("gpu_check: torch sees no CUDA device here; run with --dry-run for the CPU version", file=sys.stderr)
        return 2
    report = Report(args.out, environment(device) | {"dry_run": args.dry_run})
    chosen = [s for s in args.sections.split(",") if s] or list(sections)
    unknown = set(chosen) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(sections)}")
    ctx = gpu_sections.Context(args.out, device, args.dry_run, report)
    started = time.monotonic()
    for name in chosen:
        fn, share = sections[name]
        left = args.budget_s - (time.monotonic() - started)
        share *= args.budget_s
        if left <= 5:
            report.add(name, "skipped", "out of time", None, f"the run's --budget-s {args.budget_s:.0f} s was spent")
            continue
        t0 = time.monotonic()
        try:
            with time_box(min(left, share)):
                fn(ctx)
        except OutOfTime as exc:
            report.add(name, "time box", "cut short", None, str(exc))
        except Exception as exc:  # one section's failure is a row of the table, not the end of the run
            report.add(name, "error", f"{type(exc).__name__}: {str(exc)[:300]}", False)
        report.add(name, "seconds", round(time.monotonic() - t0, 1))
    print(f"gpu_check: {len(report.rows)} rows, {len(report.failed)} failed: {args.out / 'results.md'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
