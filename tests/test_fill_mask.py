"""fill-mask without Ray: parity with transformers' pipeline, and per-row errors."""

from __future__ import annotations

import pytest
from rayinfer_tasks.fill_mask import FillMaskTask, fill_text
from transformers import pipeline

from rayinfer.testing import run_task

TEXTS = [
    "The [MASK] statement is used for iteration over a sequence.",
    "A class is an object and [MASK] is too.",
    "Exceptions are raised by the [MASK] statement when an error occurs in a program.",
    "[MASK] names are [MASK] to objects.",
]


def _reference(pipe, text):
    ref = pipe(text)
    return ref if isinstance(ref[0], list) else [ref]


def test_matches_transformers_pipeline(rayinfer_bert):
    pipe = pipeline("fill-mask", model=str(rayinfer_bert), top_k=4)
    # a small token budget forces several micro-batches of mixed lengths
    out = run_task(FillMaskTask, [{"text": t} for t in TEXTS], rayinfer_bert, {"top_k": 4}, max_batch_tokens=40)
    for text, row in zip(TEXTS, out):
        assert row["error"] is None
        ref = _reference(pipe, text)
        assert len(row["predictions"]) == len(ref) == text.count("[MASK]")
        for ours, theirs in zip(row["predictions"], ref):
            assert [c["token_id"] for c in ours] == [c["token"] for c in theirs]
            assert [c["token"] for c in ours] == [c["token_str"] for c in theirs]
            assert [c["score"] for c in ours] == pytest.approx([c["score"] for c in theirs], abs=1e-5)
        tops = [mask[0]["token"] for mask in row["predictions"]]
        assert row["filled"] == fill_text(text, "[MASK]", tops)
        assert "[MASK]" not in row["filled"]


def test_bad_rows_get_errors_and_the_rest_is_processed(rayinfer_bert):
    rows = [
        {"text": TEXTS[0]},
        {"text": None},
        {"text": "   "},
        {"text": "there is no mask here"},
        {"text": "word " * 400 + "[MASK]"},  # the mask lies beyond the 128-token limit
        {"text": TEXTS[1]},
    ]
    out = run_task(FillMaskTask, rows, rayinfer_bert, {"top_k": 2})
    assert [r["error"] is None for r in out] == [True, False, False, False, False, True]
    assert "null" in out[1]["error"] and "empty" in out[2]["error"]
    assert "no [MASK]" in out[3]["error"] and "beyond" in out[4]["error"]
    assert all(r["predictions"] is None and r["filled"] is None for r in out[1:5])
    alone = run_task(FillMaskTask, [rows[0]], rayinfer_bert, {"top_k": 2})[0]["predictions"]
    assert [[c["token_id"] for c in m] for m in out[0]["predictions"]] == [[c["token_id"] for c in m] for m in alone]
    assert [c["score"] for m in out[0]["predictions"] for c in m] == pytest.approx(
        [c["score"] for m in alone for c in m], abs=1e-6
    )


def test_long_rows_are_truncated_or_rejected(rayinfer_bert):
    text = "[MASK] is first. " + "word " * 400
    kept = run_task(FillMaskTask, [{"text": text}], rayinfer_bert)[0]
    assert kept["error"] is None and len(kept["predictions"]) == 1
    rejected = run_task(FillMaskTask, [{"text": text}], rayinfer_bert, {"truncate": False})[0]
    assert "over the model's limit" in rejected["error"]


def test_fill_text_joins_wordpiece_continuations():
    assert fill_text("a [MASK] b [MASK]", "[MASK]", ["cat", "##s"]) == "a cat bs"
    assert fill_text("x [MASK] y", "[MASK]", [" dog"]) == "x dog y"
