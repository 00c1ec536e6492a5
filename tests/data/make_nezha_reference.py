"""Reference outputs of transformers 4.57.6's (deprecated) NEZHA, for rayinfer's own NEZHA.

transformers 5 dropped NEZHA; rayinfer implements it (rayinfer/models/nezha.py). This script runs in
a separate virtualenv with the last transformers that had it, and writes:

- tests/data/nezha-tiny/: a small NezhaForPreTraining checkpoint folder (random weights spread
  wide enough that outputs differ; max_relative_position smaller than the test sequences, so
  the clipping of relative distances is exercised) with a BERT vocab.txt, saved the way 4.x
  saves it, i.e. with the original weight names;
- tests/data/nezha-reference.safetensors: the texts (in its metadata), their inputs (tokenized by
  4.x's BertTokenizer, padded, with segment ids) and the logits of NezhaForMaskedLM, NezhaForNextSentencePrediction and
  NezhaForPreTraining loaded from that folder.

Run (make nezha-reference does all of it):
    python3 -m venv /tmp/nezha-ref && /tmp/nezha-ref/bin/pip install torch==2.13.0 transformers==4.57.6
    /tmp/nezha-ref/bin/python tests/data/make_nezha_reference.py
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import torch
import transformers
from safetensors.torch import save_file
from transformers import BertTokenizer
from transformers.models.deprecated.nezha import (
    NezhaConfig,
    NezhaForMaskedLM,
    NezhaForNextSentencePrediction,
    NezhaForPreTraining,
)

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "nezha-tiny"
REFERENCE = HERE / "nezha-reference.safetensors"

SENTENCES = [
    "the interpreter reads the [MASK] and executes each statement in order .",
    "a class defines the attributes and methods of its instances .",
    "an exception is raised when an error occurs during execution , and the [MASK] searches for a handler .",
    "the for statement iterates over the items of any sequence .",
]
PAIRS = [
    (SENTENCES[1], "instances are created by calling the class ."),
    (SENTENCES[3], "the [MASK] statement exits the loop early ."),
    (SENTENCES[0], SENTENCES[2]),
]


def build_vocab() -> list[str]:
    words: dict[str, int] = {}
    for key in sorted(topics):
        for w in re.findall(r"[a-z]+", topics[key].lower()):
            words[w] = words.get(w, 0) + 1
    wanted = {w for s in SENTENCES + [b for _, b in PAIRS] for w in re.findall(r"[a-z]+", s)}
    common = [w for w, _ in sorted(words.items(), key=lambda kv: -kv[1])[:200]]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + sorted(set(common) | wanted)


def main() -> None:
    assert transformers.__version__ == "4.57.6", transformers.__version__
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    FOLDER.mkdir(parents=True)
    vocab = build_vocab()
    (FOLDER / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(FOLDER / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(FOLDER)

    config = NezhaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, max_relative_position=8,
        pad_token_id=0, architectures=["NezhaForPreTraining"],
    )
    torch.manual_seed(0)
    model = NezhaForPreTraining(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(FOLDER, safe_serialization=True)

    single = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    pairs = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert single["input_ids"].shape[1] > 2 * config.max_relative_position
    out = {f"single_{k}": v.contiguous() for k, v in single.items()}
    out |= {f"pairs_{k}": v.contiguous() for k, v in pairs.items()}
    with torch.no_grad():
        mlm = NezhaForMaskedLM.from_pretrained(FOLDER).eval()
        out["mlm_logits"] = mlm(**single).logits
        nsp = NezhaForNextSentencePrediction.from_pretrained(FOLDER).eval()
        out["nsp_logits"] = nsp(**pairs).logits
        pre = NezhaForPreTraining.from_pretrained(FOLDER).eval()
        res = pre(**pairs)
        out["pretraining_prediction_logits"] = res.prediction_logits
        out["pretraining_seq_relationship_logits"] = res.seq_relationship_logits
    save_file({k: v.contiguous() for k, v in out.items()}, REFERENCE, metadata={
        "transformers": transformers.__version__, "sentences": json.dumps(SENTENCES), "pairs": json.dumps(PAIRS),
    })
    print(f"wrote {FOLDER} and {REFERENCE}: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
