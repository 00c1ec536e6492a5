"""PEFT adapters: merged, unmerged and a direct PeftModel give the same outputs; validate
refuses adapters that do not fit the model or the task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rayinfer_tasks.classify import ClassifyTask
from rayinfer_tasks.generate import GenerateTask
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rayinfer.api import plan_job
from rayinfer.errors import ModelError
from rayinfer.testing import build_bert, english_sentences, run_task, write_dataset

TEXTS = list(english_sentences()[400:410])


def make_lora(base: Path, out: Path, auto_class, task_type: str, targets: list[str], seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so it really changes the outputs."""
    from peft import LoraConfig, get_peft_model

    model = auto_class.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cls_adapter(rayinfer_bert_classifier, rayinfer_models_dir):
    return make_lora(rayinfer_bert_classifier, rayinfer_models_dir / "lora-cls", AutoModelForSequenceClassification, "SEQ_CLS", ["query", "value"])


@pytest.fixture(scope="module")
def causal_adapter(rayinfer_llama, rayinfer_models_dir):
    return make_lora(rayinfer_llama, rayinfer_models_dir / "lora-llama", AutoModelForCausalLM, "CAUSAL_LM", ["q_proj", "v_proj", "o_proj"])


def direct_peft_scores(base, adapter, texts):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter).eval()
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0].tolist() for t in texts]


def score_lists(rows, labels):
    return [[{s["label"]: s["score"] for s in r["scores"]}[label] for label in labels] for r in rows]


def test_classify_adapter_merged_unmerged_and_peft_model_agree(rayinfer_bert_classifier, cls_adapter):
    labels = ["neg", "neu", "pos"]
    rows = [{"text": t} for t in TEXTS]
    merged = run_task(ClassifyTask, rows, rayinfer_bert_classifier, adapter=str(cls_adapter), max_batch_tokens=64)
    unmerged = run_task(ClassifyTask, rows, rayinfer_bert_classifier, adapter=str(cls_adapter), merge_adapter=False)
    base = run_task(ClassifyTask, rows, rayinfer_bert_classifier)
    ref = direct_peft_scores(rayinfer_bert_classifier, cls_adapter, TEXTS)
    for got in (merged, unmerged):
        for row, probs in zip(score_lists(got, labels), ref):
            assert row == pytest.approx(probs, abs=1e-5)
    diff = max(abs(a - b) for r1, r2 in zip(score_lists(base, labels), ref) for a, b in zip(r1, r2))
    assert diff > 1e-2  # the adapter changes the outputs: the comparison has teeth


def test_generate_adapter_merged_unmerged_and_peft_model_agree(rayinfer_llama, causal_adapter):
    from peft import PeftModel

    prompts = [t[:80] for t in TEXTS[:4]]
    opts = {"max_new_tokens": 8}
    merged = run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama, opts, adapter=str(causal_adapter))
    unmerged = run_task(
        GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama, opts, adapter=str(causal_adapter), merge_adapter=False
    )
    base = run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama, opts)
    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rayinfer_llama), causal_adapter).eval()
    ref = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        ref.append(tok.decode(new, skip_special_tokens=True))
    assert [r["generated"] for r in merged] == ref
    assert [r["generated"] for r in unmerged] == ref
    assert [r["generated"] for r in base] != ref


def job(tmp_path, model, adapter, task="classify", options=None):
    write_dataset(tmp_path / "in", {"id": [1, 2], "text": TEXTS[:2]})
    return {
        "task": task, "model": str(model), "adapter": str(adapter), "options": options or {},
        "input": {"path": str(tmp_path / "in"), "id_column": "id"}, "output": {"path": str(tmp_path / "out")},
    }


def test_validate_accepts_a_fitting_adapter(tmp_path, rayinfer_bert_classifier, cls_adapter):
    """... and counts its parameters in an actor's memory (from its safetensors header)."""
    import math

    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    plan = plan_job(job(tmp_path, rayinfer_bert_classifier, cls_adapter))
    assert plan.adapter is not None and plan.adapter.config["task_type"] == "SEQ_CLS"
    with safe_open(str(cls_adapter / "adapter_model.safetensors"), framework="pt") as f:
        lora = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    base = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(rayinfer_bert_classifier).parameters())
    need = plan.memory_need(0)
    assert lora > 0 and need.adapter_params == lora and need.weights_bytes == 4 * (base + lora)
    assert "parameters and an adapter of " in need.describe()


def test_validate_refuses_an_adapter_for_another_base_model(tmp_path, rayinfer_models_dir, cls_adapter):
    other = build_bert(rayinfer_models_dir / "bert-cls-wide", head="sequence-classification", hidden_size=64)
    with pytest.raises(ModelError, match=r"adapter was trained on .*\(hidden_size=32\), which does not fit .*\(hidden_size=64\)"):
        plan_job(job(tmp_path, other, cls_adapter))


def test_validate_refuses_an_adapter_of_another_task_type(tmp_path, rayinfer_bert_classifier, rayinfer_llama, causal_adapter):
    with pytest.raises(ModelError, match="is a CAUSAL_LM adapter; task 'classify' .* takes SEQ_CLS adapters"):
        plan_job(job(tmp_path, rayinfer_bert_classifier, causal_adapter))
    # zero-shot-classify on the same causal LM takes it
    plan = plan_job(job(tmp_path, rayinfer_llama, causal_adapter, "zero-shot-classify", {"labels": ["a", "b"]}))
    assert plan.adapter is not None


def test_an_adapter_that_does_not_load_is_a_model_error(tmp_path, rayinfer_bert, cls_adapter):
    from rayinfer_tasks.fill_mask import FillMaskTask

    with pytest.raises(ModelError, match="cannot load adapter"):
        run_task(FillMaskTask, [{"text": "a [MASK] b"}], rayinfer_bert, adapter=str(tmp_path))
