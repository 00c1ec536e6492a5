"""The one-script GPU check (benchmarks/gpu_check.py, #39) runs as it will on a GPU machine, at toy
size on the CPU: with Ray unimportable (that machine has none), every section writes its rows, the
correctness checks hold, and what it carries (configs, tokenizers) stays small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_RAY = "import sys; sys.modules['ray'] = None; from benchmarks.gpu_check import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_the_dry_run_passes_on_the_cpu_and_writes_its_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", NO_RAY, str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {(r["section"], r["check"]): r for r in rows}
    sections = ["parity", "bf16", "seeded", "constraints", "encoders", "host_reads", "decode_speed", "encoder_speed",
                "shared_gpu", "split", "engine_transformers"]
    assert [s for s in dict.fromkeys(r["section"] for r in rows)] == sections
    assert not [r for r in rows if r["ok"] is False or r["check"] in ("error", "time box")], rows
    assert by[("parity", "fp32 greedy rows equal to generate on the prompt alone (4 chat prompts, 8 new tokens)")][
        "value"] == "4/4"
    assert by[("engine_transformers", "fp32 greedy rows equal to generate on the prompt alone (4 chat prompts, 8 new "
               "tokens)")]["value"] == "4/4"
    assert by[("split", "greedy rows equal to generate, the model on cpu (4 prompts, 8 new tokens, fp32)")]["value"] == "4/4"
    assert by[("seeded", "seeded rows identical at 1, 7, 16 rows in flight (float32)")]["value"] == "yes"
    reads = by[("host_reads", "device reads per decode step, 64 rows in flight (counted by the loop)")]
    assert reads["ok"] and reads["value"].startswith("1.00 ")
    assert any(c.startswith("rayinfer / the best generate loop") for _, c in by)
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# rayinfer GPU check: CPU") and "| section | check | value | ok | note |" in table
    carried = sum(f.stat().st_size for f in (ROOT / "benchmarks" / "gpu_models").rglob("*") if f.is_file())
    assert carried < 16 << 20, carried
