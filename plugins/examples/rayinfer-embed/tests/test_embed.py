"""The mean-embed task, tested the way a plugin author tests: rayinfer's pytest plugin gives a small
local BERT (`rayinfer_bert`) and the helpers that run a task without Ray or as a real local job."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rayinfer.testing import english_sentences, run_task
from rayinfer_embed import EmbedTask

TEXTS = list(english_sentences()[:10])


def direct_mean_pooling(model_dir, texts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            out.append(torch.nn.functional.normalize(model(**enc).last_hidden_state[0].mean(0), dim=0).tolist())
    return out


def test_equals_mean_pooling_one_text_at_a_time(rayinfer_bert):
    rows = run_task(EmbedTask, [{"text": t} for t in TEXTS], rayinfer_bert, max_batch_tokens=64)
    for row, ref in zip(rows, direct_mean_pooling(rayinfer_bert, TEXTS)):
        assert row["error"] is None and row["truncated"] is False
        assert row["embedding"] == pytest.approx(ref, abs=1e-5)
        assert math.isclose(sum(x * x for x in row["embedding"]), 1.0, rel_tol=1e-5)


def test_bad_and_long_rows(rayinfer_bert):
    rows = run_task(EmbedTask, [{"text": None}, {"text": " ".join(TEXTS)}], rayinfer_bert, {"max_length": 16})
    assert "null" in rows[0]["error"] and rows[0]["embedding"] is None
    assert rows[1]["error"] is None and rows[1]["truncated"] is True


def test_a_real_local_job_equals_mean_pooling(rayinfer_bert, rayinfer_run_job):
    rows = rayinfer_run_job("mean-embed", [{"text": t} for t in TEXTS], rayinfer_bert)
    assert [r["id"] for r in rows] == list(range(len(TEXTS)))
    for row, ref in zip(rows, direct_mean_pooling(rayinfer_bert, TEXTS), strict=True):
        assert row["error"] is None and row["truncated"] is False
        assert row["embedding"] == pytest.approx(ref, abs=1e-5)
