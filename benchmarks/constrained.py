"""Grammar libraries for constrained output, measured on the work ``generate`` gives them.

    python -m benchmarks.constrained            # ~2 min on 2 cores; xgrammar and llguidance must be installed

For each library (xgrammar, what vLLM and SGLang use; llguidance, what Guidance and llama.cpp
use), on SmolLM2-135M-Instruct's tokenizer (49,152 tokens), it prints:
  setup       wrapping the tokenizer (once per actor)
  compile     turning a constraint into a matcher's grammar (once per job and actor)
  per token   the mean cost of one decode step's constraint work for one row: the allowed-token
              mask, applying it to the row's scores [1, vocab], accepting the chosen token,
              over valid outputs' tokens (each output tokenized as the model's tokenizer does)
and, beside it, the cost of a decode step per row for this model at 32 rows (~4 ms on 2 cores),
so the overhead reads as a share of decoding. Then the generate task itself (no Ray) on 24 chat
prompts that ask for a person's name and birth year as JSON, 32 rows in flight: new tokens/s
without a constraint and with the issue's schema (llguidance), and how many outputs parse and fit.

Constraints: the issue's JSON schema (an object with a string ``name`` and an integer ``year``,
no other keys), ``choices`` [positive, negative, neutral] (as a regex alternation) and a date
regex. outlines-core is not measured: it builds a regex index over the whole vocabulary per
constraint and offers no JSON-schema matcher of its own (schemas become regexes first).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from rayinfer.constraints import apply_bitmask

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["name", "year"], "additionalProperties": False}
OUTPUTS = {
    "json_schema": ['{"name": "Ada Lovelace", "year": 1815}', '{"name":"Alan Turing","year":1912}',
                    '{"name": "Grace Hopper", "year": 1906}'],
    "choices": ["positive", "negative", "neutral"],
    "regex": ["2024-01-31", "1999-12-01", "2001-07-04"],
}
REGEX = r"\d{4}-\d{2}-\d{2}"
CHOICES = "(positive|negative|neutral)"


def _time(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def xgrammar_rows(tok: Any, vocab: int) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    setup, info = _time(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info)
    makers = {"json_schema": lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True),
              "choices": lambda: compiler.compile_regex(CHOICES), "regex": lambda: compiler.compile_regex(REGEX)}
    out: dict[str, Any] = {"setup": setup}
    for kind, make in makers.items():
        compile_s, grammar = _time(make)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        steps, seconds = 0, 0.0
        for text in OUTPUTS[kind]:
            matcher = xgr.GrammarMatcher(grammar)
            scores = torch.randn(1, vocab)
            for t in tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]:
                start = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask, 0)
                ok = matcher.accept_token(t)
                seconds += time.perf_counter() - start
                apply_bitmask(scores, bitmask)
                steps += 1
                assert ok, f"xgrammar refused {tok.decode([t])!r} in {text!r}"
            assert matcher.is_terminated()
        out[kind] = (compile_s, seconds / steps)
    return out


def llguidance_rows(tok: Any, vocab: int) -> dict[str, Any]:
    import llguidance as llg
    import llguidance.hf
    import llguidance.torch as llt
    import torch

    setup, info = _time(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab))
    makers = {"json_schema": lambda: llg.LLMatcher.grammar_from_json_schema(SCHEMA),
              "choices": lambda: llg.LLMatcher.grammar_from_regex(CHOICES),
              "regex": lambda: llg.LLMatcher.grammar_from_regex(REGEX)}
    out: dict[str, Any] = {"setup": setup}
    for kind, make in makers.items():
        compile_s, grammar = _time(lambda: (lambda g: (g, llg.LLMatcher(info, g)))(make()))
        grammar = grammar[0]
        bitmask = llt.allocate_token_bitmask(1, vocab)
        steps, seconds = 0, 0.0
        for text in OUTPUTS[kind]:
            matcher = llg.LLMatcher(info, grammar)
            scores = torch.randn(1, vocab)
            for t in tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]:
                start = time.perf_counter()
                llt.fill_next_token_bitmask(matcher, bitmask, 0)
                ok = matcher.consume_token(t)
                seconds += time.perf_counter() - start
                apply_bitmask(scores, bitmask)
                steps += 1
                assert ok, f"llguidance refused {tok.decode([t])!r} in {text!r}: {matcher.get_error()}"
            assert matcher.is_stopped(), matcher.get_error()
        out[kind] = (compile_s, seconds / steps)
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayinfer.models import catalog

    folder = str(catalog.fetch("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    vocab = model.config.vocab_size
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = torch.randint(0, vocab, (32, 1))
    with torch.inference_mode():
        model(input_ids=ids)
        step, _ = _time(lambda: model(input_ids=ids, logits_to_keep=1), repeat=3)
    per_row = step / 32
    print(f"SmolLM2-135M tokenizer, vocab {vocab}; a forward pass of 32 one-token rows: {per_row * 1e3:.2f} ms per row "
          "(a decode step's own cost is higher: its cache)")
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    scores = torch.randn(1, vocab)
    apply_bitmask(scores, bitmask)
    applied, _ = _time(lambda: apply_bitmask(scores, bitmask), repeat=200)
    print(f"applying a mask to a row's scores: {applied * 1e6:.1f} us (both libraries' masks are the same bitmask)")
    print(f"{'library':<12}{'setup s':>9}  {'constraint':<12}{'compile ms':>11}{'per token us':>14}{'% of row step':>15}")
    for name, rows in (("xgrammar", xgrammar_rows), ("llguidance", llguidance_rows)):
        got = rows(tok, vocab)
        for kind in OUTPUTS:
            compile_s, per_token = got[kind]
            print(f"{name:<12}{got['setup']:>9.2f}  {kind:<12}{compile_s * 1e3:>11.1f}{per_token * 1e6:>14.1f}"
                  f"{per_token / per_row * 100:>14.2f}%")
    task_rows(folder)


PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Isaac Newton", "Charles Darwin",
          "Albert Einstein", "Rosalind Franklin", "Nikola Tesla", "Johann Sebastian Bach", "Jane Austen",
          "Leonardo da Vinci", "Ludwig van Beethoven", "Emmy Noether", "Srinivasa Ramanujan", "Frida Kahlo",
          "Galileo Galilei", "Mary Shelley", "Louis Pasteur", "Hypatia", "Wolfgang Amadeus Mozart",
          "Florence Nightingale", "Carl Friedrich Gauss", "Virginia Woolf"]


def fits(text: str | None) -> bool:
    try:
        value = json.loads(text or "")
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "year"} and isinstance(value["name"], str) \
        and type(value["year"]) is int


def task_rows(folder: str) -> None:
    from rayinfer_tasks.generate import GenerateTask

    from rayinfer.testing import run_task

    rows = [{"prompt": f"Give {p}'s name and birth year as JSON."} for p in PEOPLE]
    print(f"\ngenerate task, {len(rows)} chat prompts, max_new_tokens 48, greedy, fp32, 32 rows in flight")
    print(f"{'constraint':<14}{'seconds':>9}{'new tokens':>12}{'new tok/s':>11}{'fit the schema':>16}"
          "   (fewer new tokens: prefill's share of the time grows)")
    # a regex that allows any text gives the same tokens as no constraint: its rate is the
    # machinery's cost (a mask and a step of the grammar per row and token, rows picked one by one)
    for name, extra in (("none", {}), ("any text", {"regex": r"[\s\S]*"}), ("json_schema", {"json_schema": SCHEMA})):
        run_task(GenerateTask, rows[:2], folder, {"chat": True, "max_new_tokens": 4, **extra})  # warm
        start = time.perf_counter()
        out = run_task(GenerateTask, rows, folder, {"chat": True, "max_new_tokens": 48, **extra}, max_batch_rows=32)
        seconds = time.perf_counter() - start
        new = sum(r["num_tokens"] or 0 for r in out)
        print(f"{name:<14}{seconds:>9.2f}{new:>12}{new / seconds:>11.1f}{sum(fits(r['generated']) for r in out):>13}/{len(out)}")


if __name__ == "__main__":
    main()
