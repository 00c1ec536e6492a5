"""nsp without Ray: parity with BertForNextSentencePrediction's softmax, pairs, truncation."""

from __future__ import annotations

import pytest
import torch
from rayinfer_tasks.nsp import NextSentenceTask
from transformers import AutoTokenizer, BertForNextSentencePrediction

from rayinfer.errors import ModelError
from rayinfer.testing import build_bert, english_sentences, run_task

SENTS = [s for s in english_sentences()[300:500] if len(s) < 150][:40]
PAIRS = [(SENTS[i], SENTS[i + 1]) for i in range(0, 20, 2)] + [(SENTS[i], SENTS[39 - i]) for i in range(0, 10, 2)]


def direct_scores(model_dir, pairs):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForNextSentencePrediction.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for a, b in pairs:
            logits = model(**tok(a, b, return_tensors="pt")).logits
            out.append(logits.softmax(-1)[0, 0].item())
    return out


def test_matches_bert_for_next_sentence_prediction(rayinfer_bert_nsp):
    rows = [{"text": a, "text_pair": b} for a, b in PAIRS]
    out = run_task(NextSentenceTask, rows, rayinfer_bert_nsp, max_batch_tokens=128)  # several padded micro-batches
    ref = direct_scores(rayinfer_bert_nsp, PAIRS)
    assert [r["error"] for r in out] == [None] * len(PAIRS)
    assert [r["score"] for r in out] == pytest.approx(ref, abs=1e-5)
    assert [r["is_next"] for r in out] == [s >= 0.5 for s in ref]
    assert len({round(s, 3) for s in ref}) > 5  # the scores differ per pair: the check has teeth


def test_threshold_and_bad_rows(rayinfer_bert_nsp):
    rows = [{"text": SENTS[0], "text_pair": SENTS[1]}, {"text": SENTS[0], "text_pair": None}, {"text": "", "text_pair": "x"}]
    low = run_task(NextSentenceTask, rows, rayinfer_bert_nsp, {"threshold": 0.0})
    assert low[0]["is_next"] is True and low[0]["error"] is None
    assert low[1]["error"] == "input 'text_pair' is null" and low[1]["score"] is None
    assert low[2]["error"] == "input 'text' is empty"
    high = run_task(NextSentenceTask, rows[:1], rayinfer_bert_nsp, {"threshold": 1.0})
    assert high[0]["is_next"] is False


def test_long_pairs_are_cut_longest_first_like_the_tokenizer(rayinfer_bert_nsp):
    long_a = " ".join(SENTS[:12])
    pairs = [(long_a, SENTS[20]), (SENTS[21], long_a)]
    out = run_task(NextSentenceTask, [{"text": a, "text_pair": b} for a, b in pairs], rayinfer_bert_nsp, {"max_length": 48})
    tok = AutoTokenizer.from_pretrained(rayinfer_bert_nsp)
    model = BertForNextSentencePrediction.from_pretrained(rayinfer_bert_nsp).eval()
    for (a, b), row in zip(pairs, out):
        enc = tok(a, b, truncation="longest_first", max_length=48, return_tensors="pt")
        assert enc["input_ids"].shape[1] == 48
        with torch.inference_mode():
            ref = model(**enc).logits.softmax(-1)[0, 0].item()
        assert row["score"] == pytest.approx(ref, abs=1e-5)
    strict = run_task(NextSentenceTask, [{"text": long_a, "text_pair": "x"}], rayinfer_bert_nsp, {"max_length": 48, "truncate": False})
    assert strict[0]["error"].startswith("input is ") and "over the model's limit of 48" in strict[0]["error"]


def test_a_pretraining_checkpoint_serves_nsp(rayinfer_models_dir):
    """BERT *ForPreTraining folders (MLM + NSP heads, like rxnfp's) load into the NSP head."""
    path = build_bert(rayinfer_models_dir / "bert-pretraining", head="pretraining")
    out = run_task(NextSentenceTask, [{"text": a, "text_pair": b} for a, b in PAIRS[:4]], path)
    from transformers import BertForPreTraining

    tok = AutoTokenizer.from_pretrained(path)
    model = BertForPreTraining.from_pretrained(path).eval()
    with torch.inference_mode():
        ref = [model(**tok(a, b, return_tensors="pt")).seq_relationship_logits.softmax(-1)[0, 0].item() for a, b in PAIRS[:4]]
    assert [r["score"] for r in out] == pytest.approx(ref, abs=1e-5)


def test_rejects_a_model_without_an_nsp_head():
    with pytest.raises(ModelError, match="next-sentence-prediction head"):
        NextSentenceTask.check_model_config({"architectures": ["BertForSequenceClassification"]}, NextSentenceTask.Options())


def test_the_nsp_head_must_be_in_the_weights(rayinfer_bert, rayinfer_models_dir):
    """A masked-LM-only checkpoint has no NSP weights: an error, not a random head. A checkpoint
    named *ForMaskedLM that carries them (like bert-base-uncased) works."""
    import json
    import shutil

    with pytest.raises(ModelError, match="has no trained next-sentence head .*seq_relationship"):
        run_task(NextSentenceTask, [{"text": "a", "text_pair": "b"}], rayinfer_bert)
    named = rayinfer_models_dir / "bert-pretraining-named-mlm"
    shutil.copytree(build_bert(rayinfer_models_dir / "bert-pretraining-2", head="pretraining"), named)
    cfg = json.loads((named / "config.json").read_text())
    NextSentenceTask.check_model_config({**cfg, "architectures": ["BertForMaskedLM"]}, NextSentenceTask.Options())
    (named / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    assert run_task(NextSentenceTask, [{"text": "a", "text_pair": "b"}], named)[0]["error"] is None
