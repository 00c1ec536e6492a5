"""rayinfer's NEZHA against transformers 4.57.6's (its last release with NEZHA).

The reference folder and outputs were made by tests/data/make_nezha_reference.py in a separate
virtualenv with transformers 4.57.6; CI has only transformers 5 and reads the committed files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rayinfer_tasks.fill_mask import FillMaskTask
from rayinfer_tasks.nsp import NextSentenceTask
from safetensors.torch import load_file
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoTokenizer,
)

from rayinfer.models.nezha import NezhaForMaskedLM, NezhaForNextSentencePrediction, register
from rayinfer.testing import run_task

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "nezha-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    register()
    return load_file(DATA / "nezha-reference.safetensors")


def inputs(ref, prefix):
    return {k: ref[f"{prefix}_{k}"] for k in ("input_ids", "token_type_ids", "attention_mask")}


def test_the_reference_exercises_clipped_distances(ref):
    import json

    config = json.loads((FOLDER / "config.json").read_text())
    assert config["model_type"] == "nezha" and config["transformers_version"] == "4.57.6"
    assert ref["single_input_ids"].shape[1] > 2 * config["max_relative_position"]


def test_masked_lm_logits_match_transformers_4(ref):
    model = AutoModelForMaskedLM.from_pretrained(FOLDER).eval()
    assert type(model) is NezhaForMaskedLM
    assert model.cls.predictions.decoder.weight.data_ptr() == model.nezha.embeddings.word_embeddings.weight.data_ptr()
    with torch.inference_mode():
        logits = model(**inputs(ref, "single")).logits
    torch.testing.assert_close(logits, ref["mlm_logits"], atol=TOL, rtol=0)
    assert ref["mlm_logits"].std() > 1  # wide random weights: outputs far from uniform


def test_next_sentence_logits_match_transformers_4(ref):
    model = AutoModelForNextSentencePrediction.from_pretrained(FOLDER).eval()
    assert type(model) is NezhaForNextSentencePrediction
    with torch.inference_mode():
        logits = model(**inputs(ref, "pairs")).logits
    torch.testing.assert_close(logits, ref["nsp_logits"], atol=TOL, rtol=0)


def test_pretraining_heads_match_transformers_4(ref):
    model = AutoModelForPreTraining.from_pretrained(FOLDER).eval()
    with torch.inference_mode():
        out = model(**inputs(ref, "pairs"))
    torch.testing.assert_close(out.prediction_logits, ref["pretraining_prediction_logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(out.seq_relationship_logits, ref["pretraining_seq_relationship_logits"], atol=TOL, rtol=0)


def texts():
    from safetensors import safe_open

    with safe_open(DATA / "nezha-reference.safetensors", "pt") as f:
        meta = f.metadata()
    return json.loads(meta["sentences"]), [tuple(p) for p in json.loads(meta["pairs"])]


def test_the_tokenizer_gives_the_reference_ids(ref):
    """The folder's vocab.txt, loaded by transformers 5, encodes the texts as 4.x did."""
    sentences, pairs = texts()
    tok = AutoTokenizer.from_pretrained(FOLDER)
    single = tok(sentences, padding=True, return_tensors="pt")
    both = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(single[key], ref[f"single_{key}"]), key
        assert torch.equal(both[key], ref[f"pairs_{key}"]), key


def test_fill_mask_and_nsp_tasks_run_on_the_nezha_folder(ref, tmp_path):
    """The tasks load the folder through the Auto classes, as an actor does, and match the
    direct model call; the masked-LM scores are the reference logits' softmax."""
    sentences, pairs = texts()
    masked = [s for s in sentences if "[MASK]" in s]
    out = run_task(FillMaskTask, [{"text": s} for s in masked], FOLDER, {"top_k": 3})
    ids = ref["single_input_ids"]
    for row, s in zip(out, masked):
        i = sentences.index(s)
        pos = (ids[i] == 4).nonzero()[0].item()  # [MASK] is id 4 in vocab.txt
        probs = ref["mlm_logits"][i, pos].softmax(-1)
        top = probs.topk(3)
        assert [c["token_id"] for c in row["predictions"][0]] == top.indices.tolist()
        assert [c["score"] for c in row["predictions"][0]] == pytest.approx(top.values.tolist(), abs=1e-5)

    out = run_task(NextSentenceTask, [{"text": a, "text_pair": b} for a, b in pairs], FOLDER)
    scores = ref["nsp_logits"].softmax(-1)[:, 0].tolist()
    assert [r["score"] for r in out] == pytest.approx(scores, abs=1e-5)
