"""generate and summarize without Ray: parity with direct model.generate calls."""

from __future__ import annotations

import pytest
import torch
from rayinfer_tasks.generate import GenerateTask
from rayinfer_tasks.summarize import SummarizeTask
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from rayinfer.models import catalog
from rayinfer.testing import english_sentences, run_task

PROMPTS = [s for s in english_sentences()[200:260] if len(s) < 160][:7]


def direct_greedy(model_dir, prompt, max_new_tokens):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_left_padded_batches_equal_one_by_one_generation(rayinfer_llama):
    opts = {"max_new_tokens": 12}
    batched = run_task(GenerateTask, [{"prompt": p} for p in PROMPTS], rayinfer_llama, opts)
    for prompt, row in zip(PROMPTS, batched):
        assert row["error"] is None
        assert (row["generated"], row["num_tokens"]) == direct_greedy(rayinfer_llama, prompt, 12)
    # mixed lengths cut into several micro-batches give the same again
    small = run_task(GenerateTask, [{"prompt": p} for p in PROMPTS], rayinfer_llama, opts, max_batch_tokens=80)
    assert [r["generated"] for r in small] == [r["generated"] for r in batched]


def test_seeded_sampling_gives_a_row_the_same_text_whatever_its_batch(rayinfer_llama):
    opts = {"max_new_tokens": 10, "do_sample": True, "seed": 7, "temperature": 1.3, "top_k": 50, "top_p": 0.95}
    alone = [run_task(GenerateTask, [{"prompt": p}], rayinfer_llama, opts)[0]["generated"] for p in PROMPTS[:4]]
    together = [r["generated"] for r in run_task(GenerateTask, [{"prompt": p} for p in PROMPTS[:4]], rayinfer_llama, opts)]
    shuffled = run_task(GenerateTask, [{"prompt": p} for p in reversed(PROMPTS[:4])], rayinfer_llama, opts)
    assert alone == together == [r["generated"] for r in reversed(shuffled)]
    other_seed = run_task(GenerateTask, [{"prompt": p} for p in PROMPTS[:4]], rayinfer_llama, {**opts, "seed": 8})
    assert [r["generated"] for r in other_seed] != together
    greedy = run_task(GenerateTask, [{"prompt": p} for p in PROMPTS[:4]], rayinfer_llama, {"max_new_tokens": 10})
    assert [r["generated"] for r in greedy] != together


def test_chat_template_and_stop_strings(rayinfer_llama):
    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    row = run_task(GenerateTask, [{"prompt": PROMPTS[0]}], rayinfer_llama, {"chat": True, "system": "be brief", "max_new_tokens": 8})[0]
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert row["generated"] == tok.decode(new, skip_special_tokens=True)
    words = row["generated"].split()
    assert len(words) > 2, row
    stop = words[1]
    stopped = run_task(GenerateTask, [{"prompt": PROMPTS[0]}], rayinfer_llama,
                       {"chat": True, "system": "be brief", "max_new_tokens": 8, "stop": [stop]})[0]
    assert stopped["generated"] == row["generated"][: row["generated"].find(stop)]


@pytest.mark.parametrize("beams", [1, 3])
def test_seq2seq_summaries_equal_model_generate(rayinfer_t5, beams):
    docs = PROMPTS[:5]
    opts = {"prefix": "summarize: ", "max_new_tokens": 10, "num_beams": beams, "no_repeat_ngram_size": 2}
    rows = run_task(SummarizeTask, [{"text": d} for d in docs], rayinfer_t5, opts)
    tok = AutoTokenizer.from_pretrained(rayinfer_t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(rayinfer_t5).eval()
    for doc, row in zip(docs, rows):
        ids = tok("summarize: " + doc, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=10, num_beams=beams, no_repeat_ngram_size=2, do_sample=False)
        assert row["error"] is None and row["truncated"] is False
        assert row["summary"] == tok.decode(out[0], skip_special_tokens=True).strip()


def test_an_instruction_without_a_text_slot_is_rejected():
    with pytest.raises(ValueError, match="must contain {text}"):
        SummarizeTask.Options(instruction="Summarize.")


def test_causal_summaries_use_the_instruction_and_flag_truncation(rayinfer_llama):
    long_doc = " ".join(english_sentences()[:40])
    rows = run_task(SummarizeTask, [{"text": PROMPTS[0]}, {"text": long_doc}], rayinfer_llama,
                    {"max_new_tokens": 6, "max_input_tokens": 64, "chat": False})
    assert [r["truncated"] for r in rows] == [False, True]
    prompt = "Summarize the following text in one or two sentences.\n\n" + PROMPTS[0]
    assert rows[0]["summary"] == direct_greedy(rayinfer_llama, prompt, 6)[0].strip()


def test_gpt_neox_japanese_with_its_own_tokenizer(rayinfer_models_dir):
    """GPT-NeoX-Japanese (sub-word tokenizer with byte fallback, pad = eos): left-padded batches of
    mixed lengths equal one-by-one greedy generation, and seeded samples do not depend on the batch."""
    from rayinfer.testing import JAPANESE_SENTENCES, build_gpt_neox_japanese

    path = build_gpt_neox_japanese(rayinfer_models_dir / "neox-ja")
    prompts = list(JAPANESE_SENTENCES)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "GPTNeoXJapaneseTokenizer"
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 3  # mixed lengths: real left padding
    batched = run_task(GenerateTask, [{"prompt": p} for p in prompts], path, {"max_new_tokens": 10})
    for prompt, row in zip(prompts, batched):
        assert row["error"] is None
        assert (row["generated"], row["num_tokens"]) == direct_greedy(path, prompt, 10)
    opts = {"max_new_tokens": 8, "do_sample": True, "seed": 3}
    alone = [run_task(GenerateTask, [{"prompt": p}], path, opts)[0]["generated"] for p in prompts[:3]]
    together = run_task(GenerateTask, [{"prompt": p} for p in prompts[:3]], path, opts)
    assert alone == [r["generated"] for r in together]


def _ends(new):
    """A row's own end, from its tokens alone: after (first token % 5) + 2 tokens (2..6)."""
    return len(new) >= new[0] % 5 + 2


@pytest.mark.parametrize("shared", [False, True], ids=["own-prompts", "shared-prefix"])
@pytest.mark.parametrize("which", ["llama", "neox-ja"])
def test_continuous_batching_rows_leave_and_join_with_batch_one_parity(which, shared, rayinfer_llama, rayinfer_models_dir):
    """rayinfer.decoding with 2 slots for 7 prompts of mixed lengths: rows end at different steps
    (their own rule), waiting rows join the running batch, and every row's tokens equal
    ``model.generate`` on its prompt alone; nothing is decoded for a row after it ends. Llama
    (SDPA, boolean mask) and GPT-NeoX-Japanese (eager attention, additive mask); with prompts
    that begin alike (an instruction), that beginning is computed once and rows start from it."""
    from rayinfer import decoding
    from rayinfer.testing import JAPANESE_SENTENCES, build_gpt_neox_japanese

    if which == "llama":
        path, prompts = rayinfer_llama, PROMPTS
    else:
        path, prompts = build_gpt_neox_japanese(rayinfer_models_dir / "neox-ja"), list(JAPANESE_SENTENCES)[:7]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert decoding.supports(model, 200)
    ids = [tok(p)["input_ids"] for p in prompts]
    if shared:
        head = tok(prompts[-1] + prompts[-2])["input_ids"]
        ids = [head + i for i in ids]
    assert len({len(i) for i in ids}) > 3
    stats = decoding.DecodeStats()
    with torch.inference_mode():
        got = decoding.decode(model, ids, max_new_tokens=12, eos=set(), pad=tok.eos_token_id or 0, slots=2,
                              stopped=_ends, stats=stats)
        for row, new in zip(ids, got):
            alone = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                   max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
            want = alone[0, len(row):].tolist()
            assert new == want[: next(k for k in range(1, 13) if _ends(want[:k]))]
    assert len({len(n) for n in got}) > 1  # rows really ended at different steps
    assert stats.prefills > 2  # rows joined as others ended, not all at the start
    assert stats.row_steps == sum(len(n) for n in got) - len(got)  # each step served live rows only
    assert stats.step_reads == stats.steps and stats.prefill_reads == stats.prefills  # one read per pass
    assert (stats.prefix_tokens >= len(head)) if shared else stats.prefix_tokens == 0


def test_a_64_row_greedy_decode_reads_the_device_once_per_step(rayinfer_llama):
    """The decode loop's host reads, counted: one per decode step for all 64 rows in flight (their
    next tokens; lengths are kept on the host, the next step's tokens stay on the device), one per
    prefill pass; rows still equal ``generate`` batch by batch."""
    from rayinfer import decoding

    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    sentences = english_sentences()
    ids = [tok(sentences[i % len(sentences)][: 20 + 3 * i])["input_ids"] for i in range(64)]
    stats = decoding.DecodeStats()
    with torch.inference_mode():
        got = decoding.decode(model, ids, max_new_tokens=16, eos={tok.eos_token_id}, pad=tok.pad_token_id or 0,
                              slots=64, stats=stats)
        for row in (0, 31, 63):
            alone = model.generate(input_ids=torch.tensor([ids[row]]), attention_mask=torch.ones(1, len(ids[row]),
                                   dtype=torch.long), max_new_tokens=16, do_sample=False, pad_token_id=0,
                                   eos_token_id=tok.eos_token_id)[0, len(ids[row]):].tolist()
            assert got[row] == alone[: len(got[row])] and (len(got[row]) == 16 or alone[len(got[row])] == tok.eos_token_id)
    assert stats.steps >= 15 and stats.step_reads == stats.steps and stats.prefill_reads == stats.prefills
    print(f"64 rows: {stats.steps} decode steps, {stats.step_reads} host reads in them "
          f"({stats.step_reads / stats.steps:.2f} per step); {stats.prefills} prefills, {stats.prefill_reads} reads")


SMOLLM2 = "smollm2-135m-instruct"
PARITY_PROMPTS = [
    "What does the Python statement `assert` do? Answer in two sentences.",
    "When would I use `lambda` in Python? Give one short example.",
    "What does the Python statement `yield` do? Answer in two sentences.",
    "Write a four-line poem about the sea at night.",
    "Write a short product description for a red bicycle.",
    "Give three tips for learning to cook.",
    "Explain saving money to a ten-year-old in a few sentences.",
    "Write a four-line poem about autumn leaves.",
    "Summarize: " + english_sentences()[3],
    "Summarize: " + " ".join(english_sentences()[10:13]),
    "Summarize: " + " ".join(english_sentences()[20:24]),
    "Give three tips for public speaking.",
]


@pytest.mark.skipif(not catalog.is_installed(SMOLLM2), reason=f"rayinfer models fetch {SMOLLM2}")
@pytest.mark.slow
def test_greedy_generation_in_decode_batches_equals_batch_one_generate_on_smollm2():
    """#24's parity check: 12 varied chat prompts through the generate task (continuous batching,
    5 rows in flight: rows end at their own end-of-sequence, waiting rows join) give, in fp32,
    exactly the text of ``model.generate`` on each prompt alone."""
    from rayinfer.text import encode_prompts

    model_dir = str(catalog.model_dir(SMOLLM2))
    rows = run_task(GenerateTask, [{"prompt": p} for p in PARITY_PROMPTS], model_dir,
                    {"chat": True, "max_new_tokens": 48}, max_batch_rows=5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, row in zip(PARITY_PROMPTS, rows):
        ids = torch.tensor([encode_prompts(tok, [prompt], chat=True)[0]])
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        n = next((j for j, t in enumerate(new) if t == tok.eos_token_id), len(new))
        assert row["generated"] == tok.decode(new[:n], skip_special_tokens=True), prompt
        assert row["num_tokens"] == n


def test_the_lean_llama_step_gives_the_models_own_logits_and_tokens(rayinfer_llama, monkeypatch):
    """``rayinfer.decoding.fast.LlamaStep`` (a Llama decode step as one plain loop over the model's
    modules; grouped-query attention, 4 heads on 2): unprepared, its logits equal the model's
    forward on the same slot cache bit for bit; prepared (q/k/v and gate/up fused into one packed
    matmul each), decoding 7 prompts through it gives the tokens of decoding through the model's
    forward, and of ``model.generate`` on each prompt alone."""
    from transformers.cache_utils import Cache

    from rayinfer import decoding
    from rayinfer.decoding import cache, fast, loop

    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    config = model.config
    assert fast.LlamaStep.fits(model) and config.num_key_value_heads < config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    rows, room = 5, 40
    shared = cache.Slots(torch.tensor([3, 17, 9, 30, 1]), torch.arange(rows))
    shared.width = int(shared.lens.max()) + 1
    dim = config.hidden_size // config.num_attention_heads
    layers = [cache.SlotLayer(shared, *(torch.randn(rows, config.num_key_value_heads, room, dim, generator=gen) for _ in "kv"))
              for _ in range(config.num_hidden_layers)]
    tokens = torch.randint(0, config.vocab_size, (rows, 1), generator=gen)
    mask = (torch.arange(shared.width)[None, :] <= shared.lens[:, None])[:, None, None, :]
    with torch.inference_mode():
        want = model(input_ids=tokens, attention_mask=mask, position_ids=shared.lens[:, None].clone(), use_cache=True,
                     logits_to_keep=1, cache=Cache(layers=layers)).logits[:, -1]
        assert torch.equal(fast.LlamaStep(model)(tokens, shared.lens[:, None].clone(), mask, layers), want)

    assert decoding.prepare(model) > 0 and hasattr(model.model.layers[0].self_attn, "rayinfer_qkv")
    calls = []
    original = fast.LlamaStep.__call__
    monkeypatch.setattr(fast.LlamaStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    got = {}
    with torch.inference_mode():
        for lean in (True, False):
            monkeypatch.setattr(loop, "LEAN_STEPS", lean)
            got[lean] = decoding.decode(model, ids, max_new_tokens=12, eos=set(), pad=0, slots=3)
        alone = [model.generate(input_ids=torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(i):].tolist()
                 for i in ids]
    assert calls  # the lean steps ran
    assert got[True] == got[False] == alone


@pytest.mark.slow  # generate_batch's scheduler costs ~20 s on a 2-core CPU even for a tiny model
def test_the_transformers_engine_gives_generates_greedy_tokens_and_refuses_what_it_lacks(rayinfer_llama):
    """``options.engine: transformers`` (transformers' own continuous batching, generate_batch):
    fp32 greedy text and token counts equal ``model.generate`` on each of 12 prompts alone; per-row
    seeds, constraints and a repetition penalty, which it has not, are refused by the options."""
    from helpers import generate_alone
    from pydantic import ValidationError

    prompts = [s for s in english_sentences()[500:540] if len(s) < 150][:12]
    rows = run_task(GenerateTask, [{"prompt": p} for p in prompts], rayinfer_llama,
                    {"max_new_tokens": 16, "engine": "transformers"})
    tok = AutoTokenizer.from_pretrained(rayinfer_llama)
    model = AutoModelForCausalLM.from_pretrained(rayinfer_llama).eval()
    for prompt, row in zip(prompts, rows):
        assert (row["generated"], row["num_tokens"], row["error"]) == (*generate_alone(model, tok, prompt, 16), None)
    for extra in ({"seed": 3, "do_sample": True}, {"repetition_penalty": 1.2}, {"choices": ["yes", "no"]}):
        with pytest.raises(ValidationError, match="engine: transformers has no (seed|repetition_penalty|choices)"):
            GenerateTask.Options.model_validate({"engine": "transformers", **extra})
