"""token-classify without Ray: the token-classification pipeline's entities, row for row (every
aggregation, strided windows over long texts), and a job."""

from __future__ import annotations

import pytest
from rayinfer_tasks.token_classify import TokenClassifyTask
from transformers import pipeline

from rayinfer.errors import ModelError
from rayinfer.testing import english_paragraphs, english_sentences, run_task

LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
TEXTS = list(english_sentences()[:200])


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory):
    """A small BERT with a 7-tag BIO head (random weights, spread: many tokens are tagged)."""
    from rayinfer.testing import build_bert

    return build_bert(tmp_path_factory.mktemp("ner") / "model", head="token-classification", labels=LABELS)


def same_entities(got, want, key):
    assert [(e[key], e["word"], e["start"], e["end"]) for e in got] == \
        [(e[key], e["word"], e["start"], e["end"]) for e in want]
    assert [e["score"] for e in got] == pytest.approx([float(e["score"]) for e in want], abs=1e-4)


@pytest.mark.parametrize("aggregation", ["simple", "first", "average", "max", "none"])
def test_the_pipelines_entities_on_200_rows(ner_model, aggregation):
    import warnings

    pipe = pipeline("token-classification", model=str(ner_model), aggregation_strategy=aggregation)
    rows = run_task(TokenClassifyTask, [{"text": t} for t in TEXTS], ner_model, {"aggregation": aggregation},
                    max_batch_tokens=512)
    key = "entity" if aggregation == "none" else "entity_group"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Tokenizer does not support real words": the pipeline's own heuristic
        want = pipe(TEXTS)
    assert sum(len(w) for w in want) > 200  # the head tags: there is something to compare
    for row, ref in zip(rows, want):
        assert row["error"] is None and row["truncated"] is False
        same_entities(row["entities"], ref, key)
        if aggregation == "none":
            assert [e["index"] for e in row["entities"]] == [e["index"] for e in ref]


def test_long_texts_in_strided_windows_as_the_pipeline(ner_model):
    texts = [p for p in english_paragraphs() if len(p) > 900][:20]
    pipe = pipeline("token-classification", model=str(ner_model), aggregation_strategy="simple", stride=16)
    rows = run_task(TokenClassifyTask, [{"text": t} for t in texts], ner_model, {"stride": 16})
    for row, ref, text in zip(rows, pipe(texts), texts):
        assert row["error"] is None and row["truncated"] is False
        same_entities(row["entities"], ref, "entity_group")
        assert all(text[e["start"]:e["end"]] for e in row["entities"])
    assert max(e["end"] for r in rows for e in r["entities"]) > 600  # entities past the first window
    cut = run_task(TokenClassifyTask, [{"text": t} for t in texts], ner_model)
    assert all(r["truncated"] for r in cut) and max(e["end"] for r in cut for e in r["entities"]) < 700


def test_options_and_models_that_cannot_serve(ner_model, rayinfer_bert_classifier):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stride merges the entities found in overlapping windows"):
        TokenClassifyTask.Options(aggregation="none", stride=8)
    with pytest.raises(ModelError, match="needs a token-classification head"):
        TokenClassifyTask.check_model_config({"architectures": ["BertForSequenceClassification"]},
                                             TokenClassifyTask.Options())
    with pytest.raises(ModelError, match="stride 126 leaves no new tokens in a window of 128"):
        run_task(TokenClassifyTask, [{"text": "x"}], ner_model, {"stride": 126})
    rows = run_task(TokenClassifyTask, [{"text": ""}, {"text": TEXTS[0]}], ner_model, {"ignore_labels": ["O", "PER", "ORG", "LOC"]})
    assert rows[0]["error"] == "input 'text' is empty" and rows[1] == {"entities": [], "truncated": False, "error": None}


def test_a_job_on_the_embedded_ray(ner_model, rayinfer_run_job):
    rows = rayinfer_run_job("token-classify", [{"text": t} for t in TEXTS[:40]], ner_model, {"aggregation": "first"})
    pipe = pipeline("token-classification", model=str(ner_model), aggregation_strategy="first")
    assert [r["id"] for r in rows] == list(range(40))
    for row, ref in zip(rows, pipe(TEXTS[:40])):
        same_entities(row["entities"], ref, "entity_group")
