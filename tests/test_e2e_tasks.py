"""One end-to-end job per built-in task on the embedded Ray: Parquet in, Parquet out, every id
exactly once, and outputs equal to the same task run without Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayinfer.api import run_job
from rayinfer.testing import JAPANESE_SENTENCES, build_t5, english_sentences, run_task, write_dataset

from helpers import write_job

SENTS = [s for s in english_sentences()[500:700] if len(s) < 140]
NEZHA = Path(__file__).parent / "data" / "nezha-tiny"


def nezha_text(i):
    import json

    from safetensors import safe_open

    with safe_open(NEZHA.parent / "nezha-reference.safetensors", "pt") as f:
        meta = f.metadata()
    sents = json.loads(meta["sentences"])
    return sents[i % len(sents)]


def cases(models_dir: Path, fixtures: dict[str, Path]) -> dict[str, tuple]:
    """task -> (model, input columns by task input name, options, output columns compared)."""
    n = 24
    return {
        "classify": (fixtures["bert_classifier"], {"text": SENTS[:n]}, {"top_k": 2}, ["label", "score"]),
        "classify-zero-shot": (
            fixtures["llama"], {"text": SENTS[:n]}, {"labels": ["code", "prose"], "prompt": "{text}\nKind:"},
            ["label", "score"],
        ),
        "nsp": (fixtures["bert_nsp"], {"text": SENTS[:n], "text_pair": SENTS[1 : n + 1]}, {}, ["is_next", "score"]),
        "nsp-nezha": (NEZHA, {"text": [nezha_text(i) for i in range(n)], "text_pair": [nezha_text(i + 1) for i in range(n)]},
                      {}, ["is_next", "score"]),
        "fill-mask-nezha": (NEZHA, {"text": [nezha_text(0), nezha_text(2)] * (n // 2)}, {"top_k": 2}, ["filled"]),
        "generate": (fixtures["llama"], {"prompt": SENTS[:n]}, {"max_new_tokens": 6}, ["generated", "num_tokens"]),
        "generate-japanese": (
            fixtures["neox_ja"], {"prompt": list(JAPANESE_SENTENCES) * 3}, {"max_new_tokens": 6, "do_sample": True, "seed": 1},
            ["generated"],
        ),
        "summarize": (
            fixtures["t5"], {"text": SENTS[:n]}, {"prefix": "summarize: ", "max_new_tokens": 6, "num_beams": 2},
            ["summary", "truncated"],
        ),
    }


@pytest.fixture(scope="module")
def fixtures(models_dir, bert_classifier, bert_nsp, llama):
    from rayinfer.testing import build_gpt_neox_japanese

    return {
        "bert_classifier": bert_classifier, "bert_nsp": bert_nsp, "llama": llama,
        "t5": build_t5(models_dir / "t5-e2e"), "neox_ja": build_gpt_neox_japanese(models_dir / "neox-ja-e2e"),
    }


TASK = {"classify-zero-shot": "classify", "nsp-nezha": "nsp", "fill-mask-nezha": "fill-mask", "generate-japanese": "generate"}


@pytest.mark.parametrize(
    "case", ["classify", "classify-zero-shot", "nsp", "nsp-nezha", "fill-mask-nezha", "generate", "generate-japanese", "summarize"]
)
def test_job_per_task(case, tmp_path, models_dir, fixtures, ray_session):
    from rayinfer.plugins import load_registry

    model, inputs, options, compared = cases(models_dir, fixtures)[case]
    task = TASK.get(case, case)
    n = len(next(iter(inputs.values())))
    ids = [f"row-{i:03d}" for i in range(n)]
    columns = {"uid": ids, **{f"col_{k}": v for k, v in inputs.items()}}
    write_dataset(tmp_path / "in", columns, files=2, row_group_size=5)
    job = write_job(
        tmp_path / "job.yaml", task=task, model=str(model), options=options,
        input={"path": str(tmp_path / "in"), "id_column": "uid", "columns": {k: f"col_{k}" for k in inputs}},
        output={"path": str(tmp_path / "out")}, runtime={"batch_size": 8, "num_cpus": 1},
    )
    manifest = run_job(job)
    assert manifest["status"] == "complete" and manifest["rows"] == n and manifest["errors"] == 0

    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["uid"] for r in out) == ids
    by_id = {r["uid"]: r for r in out}
    direct = run_task(load_registry().get(task), [{k: v[i] for k, v in inputs.items()} for i in range(n)], model, options)
    for i, d in enumerate(direct):
        got = by_id[ids[i]]
        assert got["error"] is None
        for col in compared:
            if isinstance(d[col], float):
                assert got[col] == pytest.approx(d[col], abs=1e-5), (i, col)
            else:
                assert got[col] == d[col], (i, col)
