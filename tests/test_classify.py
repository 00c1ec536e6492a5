"""classify without Ray: parity with transformers' text-classification pipeline."""

from __future__ import annotations

import pytest
from transformers import pipeline

from rayinfer.errors import ModelError
from rayinfer.testing import english_sentences, run_task
from rayinfer_tasks.classify import ClassifyTask

TEXTS = list(english_sentences()[100:112])


@pytest.mark.parametrize("function", ["softmax", "sigmoid"])
def test_matches_transformers_pipeline(bert_classifier, function):
    pipe = pipeline("text-classification", model=str(bert_classifier), top_k=None, function_to_apply=function)
    out = run_task(
        ClassifyTask, [{"text": t} for t in TEXTS], bert_classifier, {"function": function}, max_batch_tokens=64
    )
    for text, row in zip(TEXTS, out):
        ref = pipe(text)
        ref = ref[0] if isinstance(ref[0], list) else ref  # transformers 5 nests a single input
        assert row["error"] is None
        assert [s["label"] for s in row["scores"]] == [r["label"] for r in ref]
        assert [s["score"] for s in row["scores"]] == pytest.approx([r["score"] for r in ref], abs=1e-5)
        assert row["label"] == ref[0]["label"]
        assert row["score"] == pytest.approx(ref[0]["score"], abs=1e-5)


def test_top_k_and_bad_rows(bert_classifier):
    out = run_task(ClassifyTask, [{"text": TEXTS[0]}, {"text": ""}, {"text": None}], bert_classifier, {"top_k": 2})
    assert len(out[0]["scores"]) == 2 and out[0]["scores"][0]["label"] == out[0]["label"]
    assert out[1]["error"] == "input 'text' is empty" and out[2]["error"] == "input 'text' is null"
    assert out[1]["label"] is None and out[2]["scores"] is None


def test_rejects_a_model_without_a_classification_head():
    with pytest.raises(ModelError, match="sequence-classification head"):
        ClassifyTask.check_model_config({"architectures": ["BertForMaskedLM"]}, ClassifyTask.Options())


# zero-shot: label log-likelihoods under a causal LM

ZS_LABELS = ["network", "file", "class definition"]  # "class definition" is several tokens


def direct_zero_shot(model_dir, texts, labels, prompt, normalize="mean"):
    """Unbatched, unpadded: each (prompt + label) sequence through the model on its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
def test_zero_shot_equals_a_direct_log_likelihood_computation(llama, normalize):
    prompt = "Text: {text}\nTopic:"
    opts = {"labels": ZS_LABELS, "prompt": prompt, "normalize": normalize}
    out = run_task(ClassifyTask, [{"text": t} for t in TEXTS], llama, opts, max_batch_tokens=256)
    ref = direct_zero_shot(llama, TEXTS, ZS_LABELS, prompt, normalize)
    for row, probs in zip(out, ref):
        assert row["error"] is None
        by_label = {s["label"]: s["score"] for s in row["scores"]}
        assert [by_label[label] for label in ZS_LABELS] == pytest.approx(probs, abs=1e-5)
        assert row["label"] == ZS_LABELS[max(range(3), key=lambda i: probs[i])]
    assert len({r["label"] for r in out}) > 1 or len({round(r["score"], 4) for r in out}) > 1


def test_zero_shot_lists_labels_in_the_prompt_and_cuts_long_texts(llama):
    long_text = " ".join(english_sentences()[:60])
    opts = {"labels": ["yes", "no"], "prompt": "{text}\nAnswer {labels}:", "max_length": 64}
    out = run_task(ClassifyTask, [{"text": long_text}, {"text": TEXTS[0]}], llama, opts)
    assert [r["error"] for r in out] == [None, None]
    strict = run_task(ClassifyTask, [{"text": long_text}], llama, {**opts, "truncate": False})
    assert "left by the prompt and labels" in strict[0]["error"]


def test_zero_shot_options_and_models_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must contain {text}"):
        ClassifyTask.Options(labels=["a", "b"], prompt="no slot")
    with pytest.raises(ValidationError, match="distinct"):
        ClassifyTask.Options(labels=["a", "a"])
    with pytest.raises(ValidationError, match="softmax over the labels"):
        ClassifyTask.Options(labels=["a", "b"], function="sigmoid")
    zs = ClassifyTask.Options(labels=["a", "b"])
    with pytest.raises(ModelError, match="needs a causal LM"):
        ClassifyTask.check_model_config({"architectures": ["BertForSequenceClassification"]}, zs)
    with pytest.raises(ModelError, match="give options.labels"):
        ClassifyTask.check_model_config({"architectures": ["LlamaForCausalLM"]}, ClassifyTask.Options())
