"""Tokens chosen on the device, every row at once (rayinfer.decoding.Sampler): the processors'
arithmetic is transformers', the draws are counter-based (a row's seed and token count, nothing
else), a seeded row's tokens are the same at 1, 7 and 64 rows in flight, and greedy decoding with
a repetition penalty equals ``generate``'s."""

from __future__ import annotations

import pytest
import torch
from helpers import generate_alone
from rayinfer_tasks.generate import GenerateTask
from transformers import (AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from rayinfer import decoding
from rayinfer.decoding.sampling import uniform
from rayinfer.testing import english_sentences, run_task

M64 = (1 << 64) - 1


def splitmix(x: int) -> int:
    """splitmix64's finalizer in Python's integers: the reference for the device's int64 version."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_the_draws_are_splitmix64_of_seed_and_counter_whatever_else_is_in_the_tensor():
    seeds = [0, 1, 7, (1 << 63) - 1, 123456789012345678]
    counters = [0, 1, 2, 1000, 65535]
    got = uniform(torch.tensor(seeds), torch.tensor(counters)).tolist()
    for s, c, u in zip(seeds, counters, got):
        x = splitmix((s + splitmix((c * 0x9E3779B97F4A7C15) & M64)) & M64)
        assert u == ((x >> 11) + 1) * 2.0**-53
    assert uniform(torch.tensor(seeds[2:3]), torch.tensor(counters[2:3])).tolist() == got[2:3]  # alone, the same
    assert 0 < min(got) and max(got) <= 1


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3),
                                     dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
                                     dict(do_sample=True, top_p=0.5), dict(do_sample=True, top_k=1)])
def test_the_processed_scores_are_transformers_processors(options):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=g) * 3
    ids = torch.randint(0, 300, (6, 12), generator=g)
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter_(1, ids, True)
    sampler = decoding.Sampler(**options)
    want = scores.clone()
    if sampler.repetition_penalty != 1.0:
        want = RepetitionPenaltyLogitsProcessor(sampler.repetition_penalty)(ids, want)
    if sampler.do_sample:
        for p in ([TemperatureLogitsWarper(sampler.temperature)] if sampler.temperature != 1.0 else []) + \
                 ([TopKLogitsWarper(sampler.top_k)] if sampler.top_k else []) + \
                 ([TopPLogitsWarper(sampler.top_p)] if sampler.top_p < 1.0 else []):
            want = p(ids, want)
    got = sampler.process(scores.clone(), seen)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])
    tokens = sampler.choose(scores.clone(), seen, torch.arange(6), torch.zeros(6, dtype=torch.long))
    assert not torch.isinf(want.gather(1, tokens[:, None])).any()  # never a token the processors removed


def test_a_seeded_rows_tokens_are_the_same_at_1_7_and_64_rows_in_flight_with_one_read_per_step(rayinfer_llama):
    prompts = [s[:40 + i] for i, s in enumerate(english_sentences()[300:364])]
    options = {"max_new_tokens": 12, "do_sample": True, "seed": 11, "temperature": 0.9, "top_k": 40, "top_p": 0.95,
               "repetition_penalty": 1.1}
    runs = {k: [r["generated"] for r in run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama, options,
                                                 max_batch_tokens=1 << 20, max_batch_rows=k)] for k in (1, 7, 64)}
    assert runs[1] == runs[7] == runs[64]
    assert len(set(runs[64])) > 32  # sampled, not one text
    other = run_task(GenerateTask, [{"prompt": p} for p in prompts[:8]], rayinfer_llama, {**options, "seed": 12})
    assert [r["generated"] for r in other] != runs[64][:8]

    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    stats = decoding.DecodeStats()
    with torch.inference_mode():
        decoding.decode(model, [tok(p)["input_ids"] for p in prompts], max_new_tokens=12, eos=set(), pad=0, slots=64,
                        sampler=decoding.Sampler(True, 0.9, 40, 0.95, 1.1), seeds=list(range(64)), stats=stats)
    assert stats.steps == 11 and stats.step_reads == stats.steps  # sampling too: one read per step


def test_greedy_with_a_repetition_penalty_equals_generate(rayinfer_llama):
    prompts = english_sentences()[400:407]
    rows = run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama,
                    {"max_new_tokens": 12, "repetition_penalty": 1.5}, max_batch_rows=3)
    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    for prompt, row in zip(prompts, rows):
        assert (row["generated"], row["num_tokens"]) == generate_alone(model, tok, prompt, 12, repetition_penalty=1.5)
