"""Helpers for testing tasks and plugins without a model hub.

- ``english_sentences()`` / ``english_paragraphs()``: real English text that ships with every
  CPython (pydoc_data.topics).
- ``build_wordpiece_tokenizer`` / ``build_bert`` / ...: small random-weight models built from
  configs, with a tokenizer trained on the fly, saved with ``save_pretrained`` so the real
  ``from_pretrained`` path is what gets tested.
- ``run_task``: run a task on a list of rows in-process, exactly as an actor would, minus Ray.
- ``write_dataset``: rows -> several Parquet files, for end-to-end jobs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rayinfer.models.load import LoadContext
from rayinfer.task.base import Task
from rayinfer.task.runner import TaskRunner


@lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """Sentences from the Python reference documentation (pydoc_data.topics), deduplicated."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            sent = sent.strip()
            if 20 <= len(sent) <= 300 and not sent.startswith(("*", "|", "=", "-", ">>>")):
                seen.setdefault(sent, None)
    return tuple(seen)


def english_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python reference documentation (pydoc_data.topics), whitespace
    folded, deduplicated: real text of 60 to 2,000 characters (code and grammar blocks left out)."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "*", "=", "-", ">>>", "|")) or "::=" in para:
                continue
            para = re.sub(r"\s+", " ", para).strip()
            if 60 <= len(para) <= 2000:
                seen.setdefault(para, None)
    return tuple(seen)


SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(
    sentences: Sequence[str] | None = None, vocab_size: int = 1000, model_max_length: int = 128
) -> Any:
    """A BERT-style (WordPiece, lower-case) fast tokenizer trained on ``sentences``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = list(sentences or english_sentences()[:3000])
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_BERT))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def build_bpe_tokenizer(sentences: Sequence[str] | None = None, vocab_size: int = 1000,
                        model_max_length: int = 128) -> Any:
    """A byte-level BPE fast tokenizer (GPT-2, Llama 3, Qwen and SmolLM2 style: every token is
    bytes of the text, spaces included) trained on ``sentences``; ``<|end|>`` ends a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = list(sentences or english_sentences()[:3000])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|end|>", "<|start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", bos_token="<|start|>",
                                   model_max_length=model_max_length)


def build_bert(
    path: str | Path,
    head: str = "masked-lm",
    labels: Sequence[str] = ("negative", "positive"),
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    vocab_size: int = 1000,
    max_position_embeddings: int = 128,
) -> Path:
    """Save a small random BERT with the given head to ``path`` and return it.

    head: ``masked-lm``, ``sequence-classification``, ``token-classification``, ``next-sentence``
    or ``pretraining``; ``labels`` are the classification heads' labels.
    """
    import transformers

    classes = {
        "masked-lm": transformers.BertForMaskedLM,
        "sequence-classification": transformers.BertForSequenceClassification,
        "token-classification": transformers.BertForTokenClassification,
        "next-sentence": transformers.BertForNextSentencePrediction,
        "pretraining": transformers.BertForPreTraining,
    }
    path = Path(path)
    tokenizer = build_wordpiece_tokenizer(vocab_size=vocab_size, model_max_length=max_position_embeddings)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 16),
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return _save(classes[head], config, tokenizer, path, seed)


def _save(model_cls: Any, config: Any, tokenizer: Any, path: Path, seed: int) -> Path:
    """Instantiate with seeded random weights and save model + tokenizer the way real folders are."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    _spread_weights(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _spread_weights(model: Any, seed: int) -> None:
    """Random init gives near-uniform outputs; wider weights make top-k orderings meaningful."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run_task(
    task: type[Task],
    rows: Iterable[dict[str, Any]],
    model: str | Path,
    options: dict[str, Any] | None = None,
    *,
    max_batch_tokens: int = 2048,
    max_batch_rows: int | None = None,
    **context: Any,
) -> list[dict[str, Any]]:
    """Run ``task`` on ``rows`` (dicts keyed by the task's input names) without Ray, in passes of
    at most ``max_batch_tokens`` (and ``max_batch_rows``: a decoding task's rows in flight).

    Returns one dict per row: the task's output columns plus ``error``.
    """
    from rayinfer.models.locate import locate_model

    rows = list(rows)
    validated = task.options_for_model(task.Options.model_validate(options or {}), locate_model(str(model)))
    instance = task(validated, LoadContext(model=str(model), **context))
    instance.load()
    runner = TaskRunner(instance, max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows)
    batch = {name: [r.get(name) for r in rows] for name, spec in task.inputs.items()
             if not spec.optional or any(name in r for r in rows)}
    columns, errors = runner.run(batch)
    return [
        {**{k: v[i] for k, v in columns.items()}, "error": errors[i].message if errors[i] else None}
        for i in range(len(rows))
    ]


def write_dataset(folder: str | Path, columns: dict[str, list[Any]], files: int = 1, row_group_size: int | None = None) -> list[Path]:
    """Write ``columns`` as ``files`` Parquet files of consecutive rows in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    n = table.num_rows
    per = -(-n // files)
    paths = []
    for i in range(files):
        p = folder / f"part-{i:04d}.parquet"
        pq.write_table(table.slice(i * per, per), p, row_group_size=row_group_size)
        paths.append(p)
    return paths


def build_causal_lm(path: str | Path, seed: int = 0, hidden_size: int = 32, layers: int = 2, chat: bool = True,
                    tokenizer_kind: str = "wordpiece") -> Path:
    """A small random Llama with a chat template, no pad token and a WordPiece tokenizer (eos =
    [SEP]) or, with ``tokenizer_kind="bpe"``, a byte-level BPE one (eos = <|end|>), as real LLMs have."""
    import transformers

    path = Path(path)
    if tokenizer_kind == "bpe":
        tokenizer = build_bpe_tokenizer(model_max_length=256)
        start, end = "<|start|>", "<|end|>"
    else:
        tokenizer = build_wordpiece_tokenizer(model_max_length=256)
        tokenizer.pad_token = None
        tokenizer.eos_token = "[SEP]"
        tokenizer.bos_token = "[CLS]"
        start, end = "[CLS]", "[SEP]"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as Llama's tokenizers: no token types
    if chat:
        tokenizer.chat_template = (
            f"{{% for m in messages %}}{start} {{{{ m['role'] }}}} : {{{{ m['content'] }}}} {end} {{% endfor %}}"
            f"{{% if add_generation_prompt %}}{start} assistant : {{% endif %}}"
        )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=None,
    )
    return _save(transformers.LlamaForCausalLM, config, tokenizer, path, seed)


def build_llama_shards(path: str | Path, hidden_size: int, layers: int, intermediate_size: int,
                       vocab_size: int = 32000, shard_size: str = "1GB", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A Llama-shaped model of any size (head size 128, up to 8 key-value heads) with random
    weights (normal, std 0.02; norms 1), saved as safetensors shards in ``dtype`` with a byte-level
    BPE tokenizer: the layout of the chat models users run, built without an init pass over
    billions of parameters (2.84B parameters in about a minute on 2 cores)."""
    import torch
    import transformers

    path = Path(path)
    tokenizer = build_bpe_tokenizer(model_max_length=2048)
    heads = max(1, hidden_size // 128)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=min(8, heads), max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer.save_pretrained(path)
    return path


def build_t5(path: str | Path, seed: int = 0, d_model: int = 32, layers: int = 2) -> Path:
    """A small random T5 (seq2seq) with a WordPiece tokenizer ([PAD] starts decoding, [SEP] ends it)."""
    import transformers

    path = Path(path)
    tokenizer = build_wordpiece_tokenizer(model_max_length=256)
    tokenizer.eos_token = "[SEP]"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as T5's tokenizers: no token types
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=d_model * 2, num_layers=layers,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _save(transformers.T5ForConditionalGeneration, config, tokenizer, path, seed)


JAPANESE_SENTENCES = (
    "吾輩は猫である。名前はまだ無い。",
    "東京は日本の首都で、多くの人が住んでいます。",
    "今日は天気が良いので、公園を散歩しました。",
    "この本はとても面白かったです。",
    "富士山は日本で一番高い山です。",
    "電車が遅れたので、会議に少し遅刻しました。",
    "春になると桜の花が咲きます。",
    "私は毎朝コーヒーを飲みます。",
)


def build_gpt_neox_japanese(path: str | Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """A small random GPT-NeoX-Japanese with its own sub-word tokenizer (vocab.txt + emoji.json):
    special tokens, the 256 byte fallbacks, and the characters and bigrams of JAPANESE_SENTENCES."""
    import json

    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|startoftext|>", "<SP>", "<BR>", "<TAB>", "<URL>", "<EMAIL>", "<TEL>",
                "<DATE>", "<PRICE>", "<BLOCK>", "<KIGOU>", "<U2000U2BFF>", "<|emoji1|>", "<unk>"]
    pieces: dict[str, None] = {}
    for sent in JAPANESE_SENTENCES:
        for i, ch in enumerate(sent):
            pieces.setdefault(ch, None)
            if i + 1 < len(sent):
                pieces.setdefault(sent[i : i + 2], None)
    vocab = specials + [f"<|byte{i}|>" for i in range(256)] + [p for p in pieces if p != ","]
    work = path / "_tokenizer_src"
    work.mkdir(exist_ok=True)
    (work / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (work / "emoji.json").write_text(json.dumps({"emoji": {}, "emoji_inv": {}}), encoding="utf-8")
    tokenizer = transformers.GPTNeoXJapaneseTokenizer(str(work / "vocab.txt"), str(work / "emoji.json"))
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_attention_heads=4, num_hidden_layers=layers,
        intermediate_multiple_size=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    out = _save(transformers.GPTNeoXJapaneseForCausalLM, config, tokenizer, path, seed)
    import shutil

    shutil.rmtree(work)
    return out


def run_job_on_rows(
    task: str,
    rows: Sequence[dict[str, Any]],
    model: str | Path,
    options: dict[str, Any] | None = None,
    *,
    workdir: str | Path,
    files: int = 2,
    **spec: Any,
) -> list[dict[str, Any]]:
    """Run ``task`` through a real job: ``rows`` (dicts keyed by the task's input names) become
    Parquet files with an ``id`` column in ``workdir/in``, the job runs on Ray (the one already
    initialised, else an embedded one) with one actor (the path every row takes is the same as in
    a pool, and a test is spared a second process loading the model; ``runtime={"actors": None}``
    sizes the pool as a run does) and the output rows come back sorted by id."""
    from rayinfer.api import run_job

    workdir = Path(workdir)
    rows = list(rows)
    names = sorted({k for r in rows for k in r})
    write_dataset(workdir / "in", {"id": list(range(len(rows))), **{n: [r.get(n) for r in rows] for n in names}},
                  files=min(files, max(1, len(rows))))
    job = {
        "task": task,
        "model": str(model),
        "input": {"path": str(workdir / "in"), "id_column": "id"},
        "output": {"path": str(workdir / "out"), "mode": "overwrite"},
        "options": options or {},
        "runtime": {"batch_size": 16, "num_cpus": 1, "actors": 1},
    }
    for key, value in spec.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) and isinstance(job.get(key), dict) else value
    run_job(job)
    return sorted(pq.read_table(workdir / "out").to_pylist(), key=lambda r: r["id"])
