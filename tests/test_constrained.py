"""generate's constrained output (json_schema, regex, choices): every output fits, or its row is a
``constraint_unmet`` error; the continuous-batching engine and ``model.generate`` agree."""

from __future__ import annotations

import json
import re

import pytest
from rayinfer_tasks import _generation
from rayinfer_tasks.generate import GenerateTask
from transformers import AutoTokenizer

from rayinfer import constraints, decoding
from rayinfer.models import catalog
from rayinfer.testing import english_sentences, run_task

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["name", "year"], "additionalProperties": False}
CHOICES = ["positive", "negative", "neutral"]
PROMPTS = [s for s in english_sentences()[300:400] if len(s) < 140][:8]


def fits_schema(text: str) -> bool:
    value = json.loads(text)
    return (isinstance(value, dict) and set(value) == {"name", "year"} and isinstance(value["name"], str)
            and isinstance(value["year"], int) and not isinstance(value["year"], bool))


def by_model_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows go through ``model.generate`` and its logits processor, as for a model the engine does not run."""
    monkeypatch.setattr(decoding, "supports", lambda model, longest=None: False)


@pytest.mark.parametrize("path", ["engine", "model.generate"])
def test_every_output_fits_or_is_a_constraint_unmet_row(path, rayinfer_llama_bpe, monkeypatch):
    """A random tiny model writes what the grammar lets it: each JSON output parses and fits the
    schema; where max_new_tokens runs out first, the row is an error naming the kind, never output."""
    if path == "model.generate":
        by_model_generate(monkeypatch)
    rows = [{"prompt": p} for p in PROMPTS]
    out = run_task(GenerateTask, rows, rayinfer_llama_bpe, {"json_schema": SCHEMA, "max_new_tokens": 24}, max_batch_rows=3)
    fitted = [r for r in out if r["error"] is None]
    unmet = [r for r in out if r["error"] is not None]
    assert fitted and unmet, "the tiny model should both finish and run out of tokens here"
    assert all(fits_schema(r["generated"]) for r in fitted)
    assert all(r["error"].startswith("the output does not fit the json_schema") and r["generated"] is None
               for r in unmet)
    # with room enough every row fits (the grammar closes the object as soon as the model lets it)
    roomy = run_task(GenerateTask, rows, rayinfer_llama_bpe, {"json_schema": SCHEMA, "max_new_tokens": 200}, max_batch_rows=3)
    assert sum(r["error"] is None for r in roomy) >= len(fitted)
    assert all(fits_schema(r["generated"]) for r in roomy if r["error"] is None)

    picked = run_task(GenerateTask, rows, rayinfer_llama_bpe, {"choices": CHOICES, "max_new_tokens": 8})
    assert all(r["error"] is None and r["generated"] in CHOICES for r in picked)
    dates = run_task(GenerateTask, rows, rayinfer_llama_bpe, {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "max_new_tokens": 16})
    assert all(r["error"] is None and re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["generated"]) for r in dates)


def test_the_engine_and_model_generate_give_the_same_constrained_text(rayinfer_llama_bpe, monkeypatch):
    """Greedy under a constraint: the continuous-batching engine (rows leave and join, 3 in flight)
    and ``model.generate`` with the same masks as a logits processor give the same rows; and
    seeded sampling stays per row."""
    rows = [{"prompt": p} for p in PROMPTS]
    for opts in ({"json_schema": SCHEMA, "max_new_tokens": 40}, {"choices": CHOICES, "max_new_tokens": 4},
                 {"choices": CHOICES, "max_new_tokens": 4, "do_sample": True, "seed": 3}):
        engine = run_task(GenerateTask, rows, rayinfer_llama_bpe, opts, max_batch_rows=3)
        alone = [run_task(GenerateTask, [r], rayinfer_llama_bpe, opts)[0] for r in rows[:3]]
        assert alone == engine[:3]
        with monkeypatch.context() as m:
            by_model_generate(m)
            plain = run_task(GenerateTask, rows, rayinfer_llama_bpe, opts)
        if not opts.get("do_sample"):  # the two paths draw samples differently; greedy must agree
            assert plain == engine


def test_a_wordpiece_tokenizer_is_refused_with_what_would_work(rayinfer_llama):
    from rayinfer.errors import ModelError

    with pytest.raises(ModelError, match="needs a fast tokenizer whose tokens are pieces of the text"):
        run_task(GenerateTask, [{"prompt": PROMPTS[0]}], rayinfer_llama, {"choices": CHOICES})


def test_constraint_tokens_checked_after_the_fact():
    """``Constraint.fits`` judges a finished row's tokens: complete outputs only."""
    tok = AutoTokenizer.from_pretrained(str(catalog.model_dir("smollm2-135m-instruct"))) \
        if catalog.is_installed("smollm2-135m-instruct") else None
    if tok is None:
        pytest.skip("rayinfer models fetch smollm2-135m-instruct")
    c = constraints.Constraint(tok, constraints.grammar(json_schema=SCHEMA), 49152, [tok.eos_token_id], kind="json_schema")
    assert c.fits(tok.encode('{"name": "Ada", "year": 1815}'))
    assert not c.fits(tok.encode('{"name": "Ada", "year": 1815'))  # cut off
    assert not c.fits(tok.encode('{"name": "Ada", "year": "1815"}'))  # a string year
    assert not c.fits(tok.encode('{"name": "Ada", "year": 1815, "x": 1}'))  # another key


@pytest.mark.parametrize("options, message", [
    ({"regex": "(abc"}, "regex: "),
    ({"json_schema": {"type": "nonsense"}}, "json_schema: "),
    ({"choices": []}, "choices must be a non-empty list"),
    ({"choices": CHOICES, "regex": "a+"}, "give at most one of json_schema, regex, choices"),
    ({"choices": CHOICES, "stop": ["."]}, "stop cannot be combined with choices"),
])
def test_bad_constraints_are_refused_with_the_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerateTask.Options.model_validate(options)


def test_a_bad_regex_is_reported_in_one_line():
    with pytest.raises(constraints.ConstraintError) as caught:
        constraints.grammar(regex="(abc")
    assert "unclosed group" in str(caught.value) and "\n" not in str(caught.value)


def test_choices_with_quotes_and_spaces_are_literals(rayinfer_llama_bpe):
    odd = ['say "hi"', "a|b", "x.*"]
    out = run_task(GenerateTask, [{"prompt": p} for p in PROMPTS[:4]], rayinfer_llama_bpe, {"choices": odd, "max_new_tokens": 12})
    assert all(r["error"] is None and r["generated"] in odd for r in out)


SMOLLM2 = "smollm2-135m-instruct"
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Isaac Newton", "Charles Darwin",
          "Albert Einstein", "Rosalind Franklin", "Nikola Tesla", "Johann Sebastian Bach", "Jane Austen",
          "Leonardo da Vinci"]
REVIEWS = ["I loved it, a wonderful film.", "Terrible. A waste of money.", "It was fine, nothing special.",
           "Best purchase I have made all year!", "The battery died after two days.", "It arrived on Tuesday.",
           "Absolutely delightful service.", "I want a refund.", "The box is blue.",
           "Never again, the worst hotel.", "Great value and fast delivery.", "The manual has 40 pages."]


@pytest.mark.skipif(not catalog.is_installed(SMOLLM2), reason=f"rayinfer models fetch {SMOLLM2}")
def test_smollm2_json_schema_12_of_12_and_choices():
    """#24's must-show: a real chat model, the issue's schema: 12/12 outputs parse and fit; choices:
    every output is one of them."""
    model_dir = str(catalog.model_dir(SMOLLM2))
    rows = [{"prompt": f"Give {p}'s name and birth year as JSON."} for p in PEOPLE]
    out = run_task(GenerateTask, rows, model_dir, {"chat": True, "json_schema": SCHEMA, "max_new_tokens": 48},
                   max_batch_rows=32)
    assert [r["error"] for r in out] == [None] * 12
    assert all(fits_schema(r["generated"]) for r in out)
    assert sum(json.loads(r["generated"])["name"] == p for r, p in zip(out, PEOPLE)) >= 10
    rows = [{"prompt": f"Is this review positive, negative or neutral?\n\n{r}"} for r in REVIEWS]
    out = run_task(GenerateTask, rows, model_dir, {"chat": True, "choices": CHOICES, "max_new_tokens": 8},
                   max_batch_rows=32)
    assert all(r["error"] is None and r["generated"] in CHOICES for r in out)
    assert out[1]["generated"] == "negative" and out[0]["generated"] == "positive"


def test_a_constrained_job_writes_fitting_rows_and_unmet_error_rows(tmp_path, rayinfer_llama_bpe, ray_session):
    """Through a job (Parquet in, the embedded Ray, Parquet out): every id once; the rows that fit
    are the task's own outputs, the others error rows of kind constraint_unmet, counted as such."""
    import pyarrow.parquet as pq
    from helpers import write_job

    from rayinfer.api import run_job
    from rayinfer.testing import write_dataset

    prompts = PROMPTS * 2
    ids = [f"q{i:02d}" for i in range(len(prompts))]
    write_dataset(tmp_path / "in", {"uid": ids, "prompt": prompts}, files=2)
    options = {"json_schema": SCHEMA, "max_new_tokens": 24}
    job = write_job(tmp_path / "job.yaml", task="generate", model=str(rayinfer_llama_bpe), options=options,
                    input={"path": str(tmp_path / "in"), "id_column": "uid"}, output={"path": str(tmp_path / "out")},
                    runtime={"batch_size": 8, "num_cpus": 1, "actors": 1})
    manifest = run_job(job)
    direct = run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama_bpe, options)
    unmet = sum(d["error"] is not None for d in direct)
    assert manifest["rows"] == len(ids) and manifest["errors_this_run_by_kind"] == {"constraint_unmet": unmet} and unmet
    out = {r["uid"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == ids
    for uid, d in zip(ids, direct):
        assert (out[uid]["generated"], out[uid]["error"]) == (d["generated"], d["error"])


def test_constrained_rows_are_masked_together_and_read_the_device_once_per_step(rayinfer_llama_bpe):
    """The grammars' masks of every row in flight are filled on the host and applied on the device
    at once: a constrained decode of 8 rows reads the device once per step, as an unconstrained one
    does, and every row it ends complete fits its grammar."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(rayinfer_llama_bpe)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama_bpe).eval()
    vocab = int(model.config.vocab_size)
    constraint = constraints.Constraint(tok, constraints.grammar(json_schema=SCHEMA), vocab, [tok.eos_token_id])
    rows = [constraint.row() for _ in PROMPTS]
    stats = decoding.DecodeStats()
    with torch.inference_mode():
        news = decoding.decode(model, [tok(p)["input_ids"] for p in PROMPTS], max_new_tokens=40, eos={tok.eos_token_id},
                               pad=tok.eos_token_id, slots=8, sampler=decoding.Sampler(), constraints=rows,
                               mask=_generation.mask_rows, stats=stats)
    assert stats.steps > 5 and stats.step_reads == stats.steps
    done = [n for n, r in zip(news, rows) if r.satisfied]
    assert done and all(constraint.fits(n) for n in done)
    assert all(isinstance(json.loads(tok.decode(n, skip_special_tokens=True)), dict) for n in done)
