"""The demo: real documentation paragraphs summarized by a real model on the embedded Ray.

The corpus is CPython's own reference documentation (``pydoc_data.topics``), which ships with
every Python: real English text that nobody here wrote, available offline.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from rayinfer.models import catalog

DEMO_MODEL = "smollm2-135m-instruct"


def corpus_dir() -> Path:
    return catalog.home() / "data" / "python-docs"


def documents(max_chars: int = 1200) -> list[dict[str, Any]]:
    """One document per reference topic: its first paragraphs (grammar blocks dropped), cut at a paragraph."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        raw = topics[key]
        lines = raw.strip().splitlines()
        title = lines[0].strip() if lines else key
        paras = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
        prose = [
            re.sub(r"\s+", " ", p)
            for p in paras[1:]
            if not p.startswith((" ", "*", "=", "-", ">>>")) and "::=" not in p and len(p) > 60
        ]
        text, used = "", 0
        for p in prose:
            if used and used + len(p) > max_chars:
                break
            text += ("\n\n" if text else "") + p
            used += len(p)
        if len(text) >= 200:
            docs.append({"doc_id": key, "title": title, "text": text})
    return docs


def write_corpus(folder: Path | None = None, files: int = 2) -> Path:
    """Write the documentation corpus as Parquet files (idempotent) and return the folder."""
    folder = folder or corpus_dir()
    if folder.is_dir() and any(folder.glob("*.parquet")):
        return folder
    docs = documents()
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(docs)
    per = -(-table.num_rows // files)
    for i in range(files):
        tmp = folder / f".docs-{i}.parquet.tmp"
        pq.write_table(table.slice(i * per, per), tmp, row_group_size=32)
        tmp.rename(folder / f"docs-{i}.parquet")
    return folder


def demo_spec(docs: int, output: str) -> dict[str, Any]:
    return {
        "task": "summarize",
        "model": DEMO_MODEL,
        "input": {"path": str(catalog.home() / "data" / "python-docs-sample"), "id_column": "doc_id", "keep": ["title"]},
        "output": {"path": output, "mode": "overwrite"},
        "options": {
            "instruction": "Summarize this passage from the Python documentation in one sentence.\n\n{text}",
            "max_new_tokens": 48,
            "max_input_tokens": 384,
        },
        "runtime": {"batch_size": 8, "num_cpus": 1.5, "max_batch_tokens": 4096},
    }


def run_demo(docs: int = 12, output: str = "out/demo-summaries", say: Callable[[str], None] = print) -> dict[str, Any]:
    from rayinfer.api import run_job

    catalog.fetch(DEMO_MODEL, say=lambda s: say(f"rayinfer: {s}"))
    write_corpus()
    sample = catalog.home() / "data" / "python-docs-sample"
    all_docs = pq.read_table(corpus_dir()).to_pylist()
    # a spread of topics across the alphabet, the same every time
    step = max(1, len(all_docs) // docs)
    chosen = all_docs[::step][:docs]
    sample.mkdir(parents=True, exist_ok=True)
    for old in sample.glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.Table.from_pylist(chosen), sample / "sample.parquet")
    say(f"rayinfer: demo: summarizing {len(chosen)} Python reference topics with {DEMO_MODEL} (real weights) "
        f"on the embedded Ray")
    manifest = run_job(demo_spec(docs, output), progress=True)
    out = {r["doc_id"]: r for r in pq.read_table(output).to_pylist()}
    for doc in chosen[:4]:
        r = out[doc["doc_id"]]
        say("\n" + "-" * 78)
        say(f"[{doc['doc_id']}] {doc['title']}")
        say(textwrap.fill(doc["text"][:300] + ("..." if len(doc["text"]) > 300 else ""), 78, initial_indent="  ", subsequent_indent="  "))
        say(textwrap.fill(f"SUMMARY: {r['summary'] if r['error'] is None else 'ERROR ' + r['error']}", 78,
                          initial_indent="  ", subsequent_indent="  "))
    say("-" * 78)
    say(f"rayinfer: demo: {manifest['rows']} summaries ({manifest['errors']} errors) in {manifest['duration_s']:.1f}s; "
        f"Parquet in {Path(output).resolve()}")
    return manifest
