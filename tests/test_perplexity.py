"""perplexity without Ray: parity with transformers' own loss, one row at a time."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError
from rayinfer_tasks.perplexity import PerplexityTask
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayinfer.errors import ModelError
from rayinfer.models import catalog
from rayinfer.testing import english_sentences, run_task
from rayinfer.text import sliding_windows

TEXTS = [s for s in english_sentences()[300:400] if 40 < len(s) < 200][:10]
LONG = " ".join(english_sentences()[:12])


def direct_loss(model_dir, text, max_length=None):
    """`model(ids, labels=ids).loss` on [BOS] + the text's tokens, as one row."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = ([tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"])[:max_length]
    with torch.inference_mode():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    return float(loss), len(ids) - 1


def direct_sliding_window(model_dir, text, max_length, stride):
    """The perplexity guide's loop, each window's loss weighted by the tokens it really scores."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        window = ids[:, begin:end]
        target = window.clone()
        target[:, : -(end - prev_end)] = -100
        scored = int((target[:, 1:] != -100).sum())  # the loss shifts labels by one
        with torch.inference_mode():
            nll_sum += float(model(window, labels=target).loss) * scored
        n_tokens += scored
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll_sum / n_tokens, n_tokens


def test_equals_the_models_own_loss_row_by_row(rayinfer_llama):
    rows = run_task(PerplexityTask, [{"text": t} for t in TEXTS], rayinfer_llama, max_batch_tokens=96)
    for text, row in zip(TEXTS, rows):
        loss, scored = direct_loss(rayinfer_llama, text)
        assert row["error"] is None and row["truncated"] is False
        assert row["tokens"] == scored
        assert row["nll"] == pytest.approx(loss, abs=1e-4)
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"]), rel=1e-12)


def test_a_row_scores_the_same_whatever_rows_share_its_batch(rayinfer_llama):
    alone = [run_task(PerplexityTask, [{"text": t}], rayinfer_llama)[0]["nll"] for t in TEXTS]
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    mixed = run_task(PerplexityTask, [{"text": TEXTS[i]} for i in order], rayinfer_llama, max_batch_tokens=128)
    assert [mixed[order.index(i)]["nll"] for i in range(len(TEXTS))] == pytest.approx(alone, abs=1e-6)


def test_a_long_text_is_cut_to_the_window_and_flagged(rayinfer_llama):
    row = run_task(PerplexityTask, [{"text": LONG}], rayinfer_llama, {"max_length": 32})[0]
    loss, scored = direct_loss(rayinfer_llama, LONG, max_length=32)
    assert row["truncated"] is True and row["tokens"] == scored == 31
    assert row["nll"] == pytest.approx(loss, abs=1e-4)


def test_stride_scores_a_long_text_in_sliding_windows(rayinfer_llama):
    row = run_task(PerplexityTask, [{"text": LONG}], rayinfer_llama, {"max_length": 32, "stride": 12})[0]
    nll, scored = direct_sliding_window(rayinfer_llama, LONG, 32, 12)
    assert row["truncated"] is False and row["tokens"] == scored
    assert row["nll"] == pytest.approx(nll, abs=1e-4)


@pytest.mark.parametrize("n, stride", [(2, 1), (10, 3), (33, 16), (100, 31), (64, 1)])
def test_windows_score_every_token_but_the_first_once(n, stride):
    ids = list(range(n))
    spans = sliding_windows(ids, 32, stride)
    assert [t for _, scored in spans for t in scored] == ids[1:]
    for context, scored in spans:
        assert context and len(context) + len(scored) <= 32 and context[-1] + 1 == scored[0]


def test_null_empty_and_unscorable_rows_get_errors(rayinfer_llama):
    rows = run_task(PerplexityTask, [{"text": None}, {"text": ""}, {"text": "the"}, {"text": TEXTS[0]}],
                    rayinfer_llama, {"add_bos": False})
    assert [r["error"] for r in rows[:3]] == [
        "input 'text' is null", "input 'text' is empty", "one token: nothing to score (add_bos scores it)"]
    assert rows[3]["error"] is None and rows[3]["nll"] > 0


def test_a_stride_that_leaves_no_context_is_refused_before_the_model_loads():
    with pytest.raises(ValidationError, match="stride 32 leaves no context in a window of 32 tokens"):
        PerplexityTask.Options(max_length=32, stride=32)


def test_a_stride_over_the_models_own_window_is_refused_at_load(rayinfer_llama):
    with pytest.raises(ModelError, match="stride 300 leaves no context in a window of 256 tokens"):
        run_task(PerplexityTask, [{"text": LONG}], rayinfer_llama, {"stride": 300})


SMOLLM2 = "smollm2-135m-instruct"


@pytest.mark.skipif(not catalog.is_installed(SMOLLM2), reason=f"rayinfer models fetch {SMOLLM2}")
def test_equals_the_loss_of_a_real_model_and_prose_scores_lower_than_shuffled_words():
    model = catalog.model_dir(SMOLLM2)
    texts = TEXTS[:4]
    shuffled = [" ".join(random.Random(i).sample(t.split(), len(t.split()))) for i, t in enumerate(texts)]
    rows = run_task(PerplexityTask, [{"text": t} for t in texts + shuffled], model)
    for text, row in zip(texts + shuffled, rows):
        assert row["nll"] == pytest.approx(direct_loss(model, text)[0], abs=1e-4)
    assert all(p["perplexity"] < s["perplexity"] for p, s in zip(rows[:4], rows[4:]))
