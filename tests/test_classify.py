"""classify without Ray: parity with transformers' text-classification pipeline."""

from __future__ import annotations

import pytest
from rayinfer_tasks.classify import ClassifyTask
from transformers import pipeline

from rayinfer.errors import ModelError
from rayinfer.testing import english_sentences, run_task

TEXTS = list(english_sentences()[100:112])


@pytest.mark.parametrize("function", ["softmax", "sigmoid"])
def test_matches_transformers_pipeline(rayinfer_bert_classifier, function):
    pipe = pipeline("text-classification", model=str(rayinfer_bert_classifier), top_k=None, function_to_apply=function)
    out = run_task(
        ClassifyTask, [{"text": t} for t in TEXTS], rayinfer_bert_classifier, {"function": function}, max_batch_tokens=64
    )
    for text, row in zip(TEXTS, out):
        ref = pipe(text)
        ref = ref[0] if isinstance(ref[0], list) else ref  # transformers 5 nests a single input
        assert row["error"] is None
        assert [s["label"] for s in row["scores"]] == [r["label"] for r in ref]
        assert [s["score"] for s in row["scores"]] == pytest.approx([r["score"] for r in ref], abs=1e-5)
        assert row["label"] == ref[0]["label"]
        assert row["score"] == pytest.approx(ref[0]["score"], abs=1e-5)


def test_top_k_and_bad_rows(rayinfer_bert_classifier):
    out = run_task(ClassifyTask, [{"text": TEXTS[0]}, {"text": ""}, {"text": None}], rayinfer_bert_classifier, {"top_k": 2})
    assert len(out[0]["scores"]) == 2 and out[0]["scores"][0]["label"] == out[0]["label"]
    assert out[1]["error"] == "input 'text' is empty" and out[2]["error"] == "input 'text' is null"
    assert out[1]["label"] is None and out[2]["scores"] is None


def test_rejects_a_model_without_a_classification_head():
    with pytest.raises(ModelError, match="sequence-classification head"):
        ClassifyTask.check_model_config({"architectures": ["BertForMaskedLM"]}, ClassifyTask.Options())


@pytest.mark.parametrize("option", ["labels", "prompt", "chat"])
def test_zero_shot_options_are_refused_with_the_task_to_use(option):
    from pydantic import ValidationError

    value = {"labels": ["a", "b"], "prompt": "{text}", "chat": True}[option]
    with pytest.raises(ValidationError, match=f"{option}: zero-shot options.*use task: zero-shot-classify"):
        ClassifyTask.Options(**{option: value})


def test_a_causal_lm_is_refused_with_the_task_to_use():
    with pytest.raises(ModelError, match="needs a sequence-classification head, but the model is LlamaForCausalLM.*"
                       "zero-shot-classify"):
        ClassifyTask.check_model_config({"architectures": ["LlamaForCausalLM"]}, ClassifyTask.Options())
