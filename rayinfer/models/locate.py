"""Finding models and adapters before Ray starts: catalog names, local folders, hub ids; their
config.json and a cheap fingerprint of their weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayinfer.errors import ModelError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")

TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "source.spm", "spm.model", "sentencepiece.model", "vocab.model", "bpe.codes", "tokenizer.tiktoken",
    "tokenizer_config.json",
)
"""Files from which transformers builds a tokenizer (one is enough; ``tokenizer_config.json`` alone
for byte- and character-level tokenizers such as ByT5's, and ``model.save_pretrained`` never writes
it). A folder with none of them (a checkpoint saved with ``model.save_pretrained`` alone) makes
transformers 5 build an empty fallback tokenizer of special tokens only, silently: every word
becomes the unknown token (the actor refuses such a tokenizer too: ``load_tokenizer``)."""

TOKENIZER_PATTERNS = ("*.tiktoken", "*.gguf")
"""Tokenizers in other files: tiktoken vocabularies, and GGUF files, which carry theirs."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # "local" | "hub"
    ref: str  # the folder (local) or the hub id
    config: dict[str, Any] | None  # config.json when it could be read without downloading
    fingerprint: str | None = None  # what identifies these weights (see fingerprint_folder)


_SAMPLE = 1 << 20


def fingerprint_folder(folder: Path) -> str:
    """Identify a model or adapter folder's contents cheaply: the JSON configs and code files whole,
    and each weight file's name, size, first and last MiB (fine-tuned weights differ everywhere;
    hashing gigabytes at every validate would not be cheap). Copying the folder keeps it."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        if f.suffix in (".json", ".py"):  # .py: a model's own code (config.json's auto_map)
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif any(f.match(p) for p in WEIGHT_PATTERNS):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with f.open("rb") as fh:
                h.update(fh.read(_SAMPLE))
                if size > 2 * _SAMPLE:
                    fh.seek(size - _SAMPLE)
                    h.update(fh.read(_SAMPLE))
    return "sha256:" + h.hexdigest()[:24]


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model folder {str(folder)!r} has no config.json: is it a transformers model folder?")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{cfg}: not valid JSON: {exc}") from None


def locate_model(ref: str, what: str = "model") -> ModelLocation:
    """Resolve a spec's ``model:`` (or ``adapter:``, or ``tokenizer:``) to a local folder or a hub
    id, checking what can be checked without downloading anything."""
    from rayinfer.models import catalog  # a catalog name wins over a hub id of the same spelling

    entry = catalog.find(ref) if what == "model" else None
    if entry is not None:
        folder = catalog.model_dir(entry.name)
        if not catalog.is_installed(entry.name):
            raise ModelError(
                f"model {ref!r} is a catalog model that is not fetched yet: run `rayinfer models fetch {entry.name}`"
            )
        return ModelLocation("local", str(folder), read_config(folder), fingerprint_folder(folder))

    path = Path(os.path.expanduser(ref))
    if path.is_dir() and what == "tokenizer":
        location = ModelLocation("local", str(path.resolve()), None, fingerprint_folder(path))
        if not tokenizer_files(location):
            raise ModelError(f"tokenizer folder {ref!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, "
                             "...): give the folder of the model the checkpoint was trained from, or its hub id")
        return location
    if path.is_dir():
        marker = "adapter_config.json" if what == "adapter" else "config.json"
        if what == "adapter":
            if not (path / marker).is_file():
                raise ModelError(f"adapter folder {ref!r} has no adapter_config.json: is it a PEFT adapter?")
            config = json.loads((path / marker).read_text(encoding="utf-8"))
        else:
            config = read_config(path)
        if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
            raise ModelError(f"{what} folder {ref!r} has no weights (*.safetensors or *.bin)")
        return ModelLocation("local", str(path.resolve()), config, fingerprint_folder(path))
    if path.exists():
        raise ModelError(f"{what} {ref!r} is a file; give the folder that holds config.json and the weights")
    if ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise ModelError(f"{what} folder {ref!r} does not exist (and it is not a hub id like 'org/name')")
    # A hub id. Offline, it must already be in the local Hugging Face cache.
    marker = {"adapter": "adapter_config.json", "tokenizer": "tokenizer_config.json"}.get(what, "config.json")
    config = _cached_hub_config(ref, marker)
    if config is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(
            f"{what} {ref!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set. "
            "Give a local folder, a catalog name (`rayinfer models list`), or unset HF_HUB_OFFLINE."
        )
    return ModelLocation("hub", ref, config, f"hub:{ref}")


def tokenizer_files(model: ModelLocation) -> list[str] | None:
    """The tokenizer files a model (or tokenizer) location has: for a folder, those in it (and, for
    a sentence-transformers folder, in its transformer module's folder); for a hub id, those in the
    local Hugging Face cache, else (not offline) those the hub lists. None: cannot tell (a hub id
    out of reach), which is not a refusal."""
    if model.kind == "local":
        folder = Path(model.ref)
        found = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        found += [p.name for pattern in TOKENIZER_PATTERNS for p in folder.glob(pattern)]
        modules = read_model_file(model, "modules.json") if not found else None
        for module in modules if isinstance(modules, list) else []:
            sub = folder / str(module.get("path") or "")
            if module.get("path") and sub.is_dir():
                found += [f"{module['path']}/{n}" for n in TOKENIZER_FILES if (sub / n).is_file()]
        return found
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = [n for n in TOKENIZER_FILES if isinstance(try_to_load_from_cache(model.ref, n), str)]
    except Exception:
        cached = []
    if cached or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return cached
    try:
        from huggingface_hub import list_repo_files

        listed = list_repo_files(model.ref)
    except Exception:  # unreachable, private, rate-limited: the actor's load will say
        return None
    return [n for n in listed if n.rsplit("/", 1)[-1] in TOKENIZER_FILES or n.endswith((".tiktoken", ".gguf"))]


def check_tokenizer(model: ModelLocation, ref: str, what: str = "model") -> None:
    """Refuse, before Ray starts, a model whose tokenizer cannot be found: transformers would
    build an empty one and the job would write noise that looks like predictions."""
    if tokenizer_files(model) == []:
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if model.kind == "hub" else "in it"
        raise ModelError(
            f"{what} {ref!r} has no tokenizer files {where} ({', '.join(TOKENIZER_FILES[:4])}, ...): a checkpoint "
            "saved without its tokenizer would read every word as unknown. Set tokenizer: to the folder or hub id "
            "of the model it was trained from, or copy that model's tokenizer files into the folder"
        )


def read_model_file(model: ModelLocation, name: str) -> Any | None:
    """One of the model's JSON files (``modules.json``, ``1_Pooling/config.json``): from its folder,
    or for a hub id from the local Hugging Face cache, else (not offline) downloaded, a few KB;
    None where it has none (or it cannot be had)."""
    if model.kind == "hub":
        found = _cached_hub_config(model.ref, name)
        if found is None and os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
            try:
                from huggingface_hub import hf_hub_download

                return json.loads(Path(hf_hub_download(model.ref, name)).read_text(encoding="utf-8"))
            except Exception:  # not in the repository, or the hub unreachable: as if it had none
                return None
        return found
    path = Path(model.ref, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from None


def _cached_hub_config(repo_id: str, filename: str) -> Any | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:
        return None
    if isinstance(found, str) and os.path.isfile(found):
        try:
            return json.loads(Path(found).read_text(encoding="utf-8"))
        except Exception:
            return None
    return None


def remote_code_files(config: dict[str, Any]) -> list[str]:
    """The code files a config's ``auto_map`` names (``modeling_x.XForCausalLM`` -> ``modeling_x.py``;
    ``org/repo--modeling_x.X`` -> ``org/repo: modeling_x.py``), in order, each once."""
    refs: list[str] = []
    for value in (config.get("auto_map") or {}).values():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    files = []
    for ref in refs:
        repo, _, path = ref.rpartition("--")
        module = path.rsplit(".", 1)[0].replace(".", "/") + ".py"
        files.append(f"{repo}: {module}" if repo else module)
    return list(dict.fromkeys(files))


def check_remote_code(model: ModelLocation, ref: str, trusted: bool) -> None:
    """A model whose architecture transformers does not have runs the code its ``auto_map`` names,
    in every actor: refused unless the spec trusts it (``trust_remote_code: true``), naming that
    code. A model transformers has runs transformers' own code, whatever its ``auto_map`` says."""
    config = model.config or {}
    files = remote_code_files(config)
    if trusted or not files:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return
    where = f" in {model.ref}" if model.kind == "local" else f" of the hub repository {model.ref}"
    raise ModelError(
        f"model {ref!r} (model_type {config.get('model_type')!r}, not one transformers has) runs its own code: "
        f"config.json's auto_map names {', '.join(files)}{where}, which would run in every actor. Read it; to run "
        "it, set trust_remote_code: true in the job spec")
