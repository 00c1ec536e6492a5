from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rayinfer.testing import english_sentences, write_dataset


def masked_corpus(n: int) -> dict[str, list[Any]]:
    """n rows of real sentences with one word masked, ids 1000.. and a passthrough column."""
    sents = english_sentences()
    texts = []
    for i in range(n):
        words = sents[i % len(sents)].split()
        words[len(words) // 2] = "[MASK]"
        texts.append(" ".join(words))
    return {"doc_id": list(range(1000, 1000 + n)), "sentence": texts, "source": [f"topic-{i % 7}" for i in range(n)]}


def write_job(path: Path, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fill_mask_job(
    tmp: Path, model: Path, rows: int = 50, files: int = 2, corpus: dict[str, list[Any]] | None = None,
    row_group_size: int | None = None, **extra: Any,
) -> Path:
    write_dataset(tmp / "in", corpus or masked_corpus(rows), files=files, row_group_size=row_group_size)
    spec = {
        "task": "fill-mask",
        "model": str(model),
        "input": {"path": str(tmp / "in"), "id_column": "doc_id", "columns": {"text": "sentence"}, "keep": ["source"]},
        "output": {"path": str(tmp / "out")},
        "options": {"top_k": 3},
        "runtime": {"batch_size": 32, "num_cpus": 1},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return write_job(tmp / "job.yaml", **spec)
