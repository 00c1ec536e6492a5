"""Run every job in jobs/ as written and check what it wrote (run: make jobs).

For each job: fetch the catalog model it names (once), run it on the embedded Ray, then check
that the output has exactly one row per input id, no row errors and non-empty predictions, and
print a quality number where the data has an answer key:

- fill-mask (reaction BERT): top-1 recovery of the masked product atom, against the
  most-common-answer baseline (always guessing the atom that is most often the answer);
- classify (reaction classifier): the class codes given;
- zero-shot-classify (SmolLM2): accuracy against the hand labels, and the majority baseline;
- generate with a json_schema (SmolLM2): how many outputs parse as JSON objects with its keys;
- perplexity (SmolLM2): median perplexity of the prose and of the shuffled-word copies, and in
  how many documents the prose scores lower than its shuffled copy;
- nsp: accuracy against which pairs really follow on (hub model: skipped when offline);
- embed (all-MiniLM-L6-v2): each document's title, embedded as a query, finds that document
  first among all of them (top-1), against the 1-in-N chance.

Usage: python jobs/run_all.py [JOB_NAME ...]     (names without .yaml; default: all)
Exit status 1 when a job fails or a check does not hold.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

JOBS = Path(__file__).resolve().parent
ROOT = JOBS.parent

# the column that must be non-empty in every row, per task
PREDICTION = {"fill-mask": "filled", "classify": "label", "zero-shot-classify": "label", "nsp": "score",
              "generate": "generated", "summarize": "summary", "perplexity": "perplexity", "embed": "embedding",
              "token-classify": "truncated"}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def prepare(spec: dict[str, Any]) -> str | None:
    """Fetch what the job needs; return a reason to skip it, or None."""
    from rayinfer import demo
    from rayinfer.models import catalog

    entry = catalog.find(spec["model"])
    if entry is not None:
        if not catalog.is_installed(entry.name):
            print(f"  fetching {entry.name} ...", flush=True)
            catalog.fetch(entry.name, say=lambda s: print("  " + s, flush=True))
    elif not Path(spec["model"]).expanduser().exists() and offline():
        return f"model {spec['model']!r} is a hub id and HF_HUB_OFFLINE is set"
    if "python-docs" in str(spec["input"]["path"]):
        demo.write_corpus()
    return None


def quality(task: str, spec: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    if task == "fill-mask" and "rxn" in rows[0]:
        answers, hits = [], 0
        for r in rows:
            masked_product = r["masked"].split(">>")[1] if "masked" in r else None
            product = r["rxn"].split(">>")[1]
            if masked_product is None:
                return ""
            i = masked_product.index("[MASK]")
            answers.append(product[i])
            hits += r["predictions"][0][0]["token"].strip() == product[i]
        base = Counter(answers).most_common(1)[0][1]
        return f"masked atom top-1 {hits}/{len(rows)}; most-common-answer baseline {base}/{len(rows)}"
    if task == "zero-shot-classify" and "gold" in rows[0]:
        hits = sum(r["label"] == r["gold"] for r in rows)
        base = Counter(r["gold"] for r in rows).most_common(1)[0][1]
        return f"accuracy {hits}/{len(rows)} ({hits / len(rows):.0%}); majority baseline {base}/{len(rows)}"
    if task == "classify":
        codes = Counter(r["label"] for r in rows)
        return f"{len(codes)} distinct class codes: " + ", ".join(f"{c} x{n}" for c, n in codes.most_common(5))
    if task == "nsp" and "follows" in rows[0]:
        hits = sum(r["is_next"] == r["follows"] for r in rows)
        return f"accuracy {hits}/{len(rows)}"
    if task == "generate" and (spec.get("options") or {}).get("json_schema"):
        import json

        schema = spec["options"]["json_schema"]
        fit = 0
        for r in rows:
            value = json.loads(r["generated"])
            fit += isinstance(value, dict) and set(schema.get("required", [])) <= set(value) <= set(schema["properties"])
        return f"{fit}/{len(rows)} outputs parse as JSON objects with the schema's keys"
    if task == "generate":
        return f"mean {sum(r['num_tokens'] for r in rows) / len(rows):.0f} new tokens per row"
    if task == "perplexity" and "kind" in rows[0]:
        by_doc = {(r["doc"], r["kind"]): r["perplexity"] for r in rows}
        docs = sorted({r["doc"] for r in rows})
        lower = sum(by_doc[d, "prose"] < by_doc[d, "shuffled"] for d in docs)
        median = {k: statistics.median(by_doc[d, k] for d in docs) for k in ("prose", "shuffled")}
        return (f"median perplexity: prose {median['prose']:.1f}, shuffled words {median['shuffled']:.1f}; "
                f"prose lower in {lower}/{len(docs)} documents")
    if task == "embed" and "title" in rows[0]:
        import numpy as np
        from sentence_transformers import SentenceTransformer

        from rayinfer.models import catalog

        docs = np.array([r["embedding"] for r in rows])
        queries = SentenceTransformer(str(catalog.model_dir(spec["model"])), device="cpu").encode(
            [r["title"] for r in rows], normalize_embeddings=True)
        hits = int((np.argmax(queries @ docs.T, axis=1) == np.arange(len(rows))).sum())
        return f"{docs.shape[1]} dims; title -> its document top-1 {hits}/{len(rows)} (chance 1/{len(rows)})"
    if task == "token-classify":
        groups = Counter(e["entity_group"] for r in rows for e in r["entities"])
        return f"{sum(groups.values())} entities: " + ", ".join(f"{g} x{n}" for g, n in groups.most_common())
    if task == "summarize":
        return f"mean summary {sum(len(r['summary']) for r in rows) / len(rows):.0f} characters"
    return ""


def run_one(path: Path) -> tuple[str, str, str]:
    """-> (status, seconds, detail)"""
    import yaml

    from rayinfer.api import plan_job, run_job

    spec = yaml.safe_load(path.read_text())
    reason = prepare(spec)
    if reason:
        return "skipped", "", reason
    os.chdir(ROOT)  # the jobs' paths are relative to the repository root
    plan = plan_job(path)
    expected = []
    for f in plan.files:
        if f.path.endswith((".jsonl", ".json")):
            import pyarrow.json as pj

            expected += pj.read_json(f.path).column(plan.spec.input.id_column).to_pylist()
        else:
            expected += pq.read_table(f.path, columns=[plan.spec.input.id_column]).column(0).to_pylist()
    start = time.monotonic()
    manifest = run_job(path)
    took = f"{time.monotonic() - start:.0f}"
    rows = pq.read_table(plan.spec.output.path).to_pylist()
    id_col, pred = plan.spec.input.id_column, PREDICTION.get(plan.task_cls.name)
    problems = []
    if sorted(map(str, (r[id_col] for r in rows))) != sorted(map(str, expected)) or len(rows) != len(expected):
        problems.append(f"{len(rows)} output rows for {len(expected)} input ids, or ids differ")
    if manifest["errors"]:
        problems.append(f"{manifest['errors']} row errors")
    if pred and any(r.get(pred) in (None, "", []) for r in rows):
        problems.append(f"empty {pred!r} in some rows")
    if problems:
        return "FAILED", took, "; ".join(problems)
    return "ok", took, f"{len(rows)} rows, one per id. " + quality(plan.task_cls.name, spec, rows)


def main(argv: list[str]) -> int:
    paths = sorted(JOBS.glob("*.yaml"))
    if argv:
        paths = [p for p in paths if p.stem in argv]
    results = []
    for path in paths:
        print(f"== {path.name}", flush=True)
        try:
            results.append((path.name, *run_one(path)))
        except Exception as exc:  # report every job, then fail
            results.append((path.name, "FAILED", "", f"{type(exc).__name__}: {exc}"))
        print(f"   {results[-1][1]}: {results[-1][3]}", flush=True)
    width = max(len(r[0]) for r in results)
    print("\n| job | status | s | result |\n|---|---|---|---|")
    for name, status, took, detail in results:
        print(f"| {name:<{width}} | {status} | {took} | {detail} |")
    return 1 if any(r[1] == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
