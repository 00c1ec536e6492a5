"""An actor's memory over a long run: does it grow with the rows it has done?

    python -m benchmarks.memory                  # 300k short rows, one actor (about 90 s on 2 cores)
    python -m benchmarks.memory --rows 1000000

The workload of ``tests/test_corpus.py``'s short guard, at the length that tells a leak from
warm-up: short real sentences classified by the tiny BERT of ``rayinfer.testing``, one actor with
both cores. The actor reports its RSS about once a second; the table gives the median RSS in each
tenth of the run, and the check is the one the suite ran before it was cut short: the median after
5/6 of the rows within 20 MB of the median between 1/6 and 1/3. Over the first 120k rows the RSS
still rises by ~13 MB (allocator and reader warm-up, measured on a 2-core EPYC), which is why the
suite's 80k-row test can only catch leaks of a few hundred bytes a row, and this one catches
~150 bytes a row (an earlier design leaked that much: ~30 MB over 200k rows).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from rayinfer.api import run_job
from rayinfer.testing import build_bert, english_sentences, write_dataset

BOUND_MB = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    n = args.rows
    with tempfile.TemporaryDirectory(prefix="rayinfer-memory-") as tmp:
        tmp_path = Path(tmp)
        model = build_bert(tmp_path / "model", head="sequence-classification")
        sents = english_sentences()
        write_dataset(tmp_path / "in", {"id": list(range(n)), "text": [sents[i % len(sents)] for i in range(n)]}, files=3)
        spec = {"task": "classify", "model": str(model), "input": {"path": str(tmp_path / "in")},
                "output": {"path": str(tmp_path / "out")}, "runtime": {"actors": 1, "num_cpus": 2}}
        samples: list[tuple[int, float]] = []
        manifest = run_job(spec, progress=lambda s: samples.append((s["rows"], max(s["actor_rss_mb"].values(), default=0.0))))
    print(f"{platform.processor() or platform.machine()}: {n} rows in {manifest['duration_s']:.1f} s "
          f"({manifest['rows_per_s']:.0f} rows/s), {len(samples)} RSS samples")
    print("| rows | median actor RSS (MB) |\n|---|---|")
    for k in range(10):
        window = [rss for rows, rss in samples if k * n / 10 < rows <= (k + 1) * n / 10]
        if window:
            print(f"| {int((k + 1) * n / 10):,} | {sorted(window)[len(window) // 2]:.1f} |")
    early = [rss for rows, rss in samples if n / 6 <= rows <= n / 3]
    late = [rss for rows, rss in samples if rows >= 5 * n / 6]
    if len(early) < 3 or len(late) < 3:
        print("too few samples to judge (more rows?)")
        return
    grew = sorted(late)[len(late) // 2] - sorted(early)[len(early) // 2]
    verdict = "ok" if grew < BOUND_MB else "GREW"
    print(f"{verdict}: the actor's RSS grew {grew:.1f} MB from 1/6-1/3 of the rows to the last 1/6 (bound {BOUND_MB:.0f} MB)")


if __name__ == "__main__":
    main()
