"""zero-shot-classify without Ray: parity with an unbatched log-likelihood computation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from rayinfer_tasks.zero_shot import ZeroShotClassifyTask
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayinfer.errors import ModelError
from rayinfer.testing import english_sentences, run_task

TEXTS = list(english_sentences()[100:112])
LABELS = ["network", "file", "class definition"]  # "class definition" is several tokens


def direct_zero_shot(model_dir, texts, labels, prompt, normalize="mean"):
    """Unbatched, unpadded: each (prompt + label) sequence through the model on its own."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        ctx = tok(prompt.replace("{text}", text))["input_ids"]
        lls = []
        for label in labels:
            cont = tok(" " + label, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            ll = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            lls.append(ll / len(cont) if normalize == "mean" else ll)
        out.append(torch.tensor(lls).softmax(0).tolist())
    return out


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_equals_a_direct_log_likelihood_computation(rayinfer_llama, normalize):
    prompt = "Text: {text}\nTopic:"
    opts = {"labels": LABELS, "prompt": prompt, "normalize": normalize}
    out = run_task(ZeroShotClassifyTask, [{"text": t} for t in TEXTS], rayinfer_llama, opts, max_batch_tokens=256)
    ref = direct_zero_shot(rayinfer_llama, TEXTS, LABELS, prompt, normalize)
    for row, probs in zip(out, ref):
        assert row["error"] is None
        by_label = {s["label"]: s["score"] for s in row["scores"]}
        assert [by_label[label] for label in LABELS] == pytest.approx(probs, abs=1e-5)
        assert row["label"] == LABELS[max(range(3), key=lambda i: probs[i])]
    assert len({r["label"] for r in out}) > 1 or len({round(r["score"], 4) for r in out}) > 1


def test_lists_labels_in_the_prompt_and_cuts_long_texts(rayinfer_llama):
    long_text = " ".join(english_sentences()[:60])
    opts = {"labels": ["yes", "no"], "prompt": "{text}\nAnswer {labels}:", "max_length": 64}
    out = run_task(ZeroShotClassifyTask, [{"text": long_text}, {"text": TEXTS[0]}], rayinfer_llama, opts)
    assert [r["error"] for r in out] == [None, None]


def test_a_long_text_is_an_error_when_truncate_is_off(rayinfer_llama):
    long_text = " ".join(english_sentences()[:60])
    opts = {"labels": ["yes", "no"], "max_length": 64, "truncate": False}
    rows = run_task(ZeroShotClassifyTask, [{"text": long_text}, {"text": TEXTS[0]}], rayinfer_llama, opts)
    assert "left by the prompt and labels" in rows[0]["error"] and rows[1]["error"] is None


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param({"labels": ["a", "b"], "prompt": "no slot"}, "must contain {text}", id="prompt-without-slot"),
        pytest.param({"labels": ["a", "a"]}, "distinct", id="duplicate-labels"),
        pytest.param({"labels": ["a"]}, "at least 2", id="one-label"),
        pytest.param({}, "(?s)labels.*Field required", id="no-labels"),
        pytest.param({"labels": ["a", "b"], "function": "sigmoid"}, "(?s)function.*Extra inputs", id="classify-option"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ValidationError, match=message):
        ZeroShotClassifyTask.Options(**options)


def test_a_model_with_a_classification_head_is_refused_with_the_task_to_use():
    with pytest.raises(ModelError, match="needs a causal LM.*BertForSequenceClassification.*task: classify"):
        ZeroShotClassifyTask.check_model_config(
            {"architectures": ["BertForSequenceClassification"]}, ZeroShotClassifyTask.Options(labels=["a", "b"])
        )
