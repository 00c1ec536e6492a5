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


QUERIES = ["how do I open a file", "what does a generator yield", "how are exceptions raised"]
DOCS = list(english_sentences()[200:206])


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A one-logit BERT cross-encoder (a reranker's shape: one relevance logit per pair)."""
    from rayinfer.testing import build_bert

    return build_bert(tmp_path_factory.mktemp("cross") / "model", head="sequence-classification", labels=("relevant",))


def _pair_logits(model_dir, pairs):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(**tok(q, d, return_tensors="pt")).logits[0].tolist() for q, d in pairs]


def test_text_pairs_score_as_the_model_scores_each_pair(cross_encoder, rayinfer_bert_classifier):
    """A cross-encoder's score for (query, document) with function: none is its logit for the pair
    tokenized together; a two-label model's pair scores equal the pipeline's for {text, text_pair}."""
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    out = run_task(ClassifyTask, [{"text": q, "text_pair": d} for q, d in pairs], cross_encoder, {"function": "none"},
                   max_batch_tokens=96)
    logits = _pair_logits(cross_encoder, pairs)
    assert [r["error"] for r in out] == [None] * len(pairs)
    assert [r["score"] for r in out] == pytest.approx([l[0] for l in logits], abs=1e-5)
    alone = run_task(ClassifyTask, [{"text": q} for q, _ in pairs], cross_encoder, {"function": "none"})
    assert [r["score"] for r in alone] != pytest.approx([r["score"] for r in out], abs=1e-3)  # the pair is read

    pipe = pipeline("text-classification", model=str(rayinfer_bert_classifier), top_k=None)
    out = run_task(ClassifyTask, [{"text": q, "text_pair": d} for q, d in pairs], rayinfer_bert_classifier)
    for (q, d), row in zip(pairs, out):
        ref = pipe({"text": q, "text_pair": d})
        ref = ref[0] if isinstance(ref[0], list) else ref
        assert [s["label"] for s in row["scores"]] == [r["label"] for r in ref]
        assert [s["score"] for s in row["scores"]] == pytest.approx([r["score"] for r in ref], abs=1e-5)
    bad = run_task(ClassifyTask, [{"text": QUERIES[0], "text_pair": None}], cross_encoder)
    assert bad[0]["error"] == "input 'text_pair' is null"


def test_a_reranking_job_maps_query_and_document_columns(tmp_path, cross_encoder, ray_session):
    """columns: {text: q, text_pair: doc}: Parquet in, one score per pair out, equal to the
    model's logit; sorted per query, that is the reranking."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from click.testing import CliRunner

    from rayinfer.api import run_job
    from rayinfer.cli import main

    pairs = [(q, d) for q in QUERIES for d in DOCS]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(len(pairs))), "q": [q for q, _ in pairs], "doc": [d for _, d in pairs]}),
                   tmp_path / "in" / "pairs.parquet")
    spec = {"task": "classify", "model": str(cross_encoder), "options": {"function": "none"},
            "input": {"path": str(tmp_path / "in"), "columns": {"text": "q", "text_pair": "doc"}, "keep": ["q"]},
            "output": {"path": str(tmp_path / "out")}}
    manifest = run_job(spec)
    assert manifest["rows"] == len(pairs) and manifest["errors"] == 0
    out = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda r: r["id"])
    assert [r["score"] for r in out] == pytest.approx([l[0] for l in _pair_logits(cross_encoder, pairs)], abs=1e-5)
    ranked = {q: [r["id"] for r in sorted((r for r in out if r["q"] == q), key=lambda r: -r["score"])] for q in QUERIES}
    assert all(sorted(ids) == [i for i, (q2, _) in enumerate(pairs) if q2 == q] for q, ids in ranked.items())

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**spec, "input": {**spec["input"], "columns": {"text": "q", "text_pair": "body"}},
                                   "output": {"path": str(tmp_path / "out2")}}))
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2 and "task input 'text_pair': column 'body' is not in the input" in result.output


def test_text_pair_is_read_where_mapped_or_named_so_and_only_then(tmp_path, cross_encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayinfer.api import plan_job

    def plan(columns: dict, mapped: dict) -> dict:
        folder = tmp_path / "-".join(columns)
        folder.mkdir()
        pq.write_table(pa.table({"id": [1], **{c: ["x"] for c in columns}}), folder / "in.parquet")
        return plan_job({"task": "classify", "model": str(cross_encoder), "input": {"path": str(folder), "columns": mapped},
                         "output": {"path": str(tmp_path / "out")}}).column_map

    assert plan(["text"], {}) == {"text": "text"}
    assert plan(["text", "text_pair"], {}) == {"text": "text", "text_pair": "text_pair"}
    assert plan(["q", "doc"], {"text": "q", "text_pair": "doc"}) == {"text": "q", "text_pair": "doc"}
