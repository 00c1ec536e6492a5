"""Finding and loading models, tokenizers and PEFT adapters: the one place that knows about
devices, dtypes, hub ids and safe loading. torch/transformers are imported inside functions so
that importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayinfer.errors import ModelError
from rayinfer.task import LoadContext

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # "local" | "hub"
    ref: str  # the folder (local) or the hub id
    config: dict[str, Any] | None  # config.json when it could be read without downloading
    fingerprint: str | None = None  # what identifies these weights (see fingerprint_folder)


_SAMPLE = 1 << 20


def fingerprint_folder(folder: Path) -> str:
    """Identify a model or adapter folder's contents cheaply: the JSON configs whole, and each
    weight file's name, size, first and last MiB (fine-tuned weights differ everywhere; hashing
    gigabytes at every validate would not be cheap). Copying the folder keeps the fingerprint."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        if f.suffix == ".json":
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
    """Resolve a spec's ``model:`` (or ``adapter:``) to a local folder or a hub id, checking what
    can be checked without downloading anything."""
    from rayinfer import catalog  # a catalog name wins over a hub id of the same spelling

    entry = catalog.find(ref) if what == "model" else None
    if entry is not None:
        folder = catalog.model_dir(entry.name)
        if not catalog.is_installed(entry.name):
            raise ModelError(
                f"model {ref!r} is a catalog model that is not fetched yet: run `rayinfer models fetch {entry.name}`"
            )
        return ModelLocation("local", str(folder), read_config(folder), fingerprint_folder(folder))

    path = Path(os.path.expanduser(ref))
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
    config = _cached_hub_config(ref, "adapter_config.json" if what == "adapter" else "config.json")
    if config is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(
            f"{what} {ref!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set. "
            "Give a local folder, a catalog name (`rayinfer models list`), or unset HF_HUB_OFFLINE."
        )
    return ModelLocation("hub", ref, config, f"hub:{ref}")


def _cached_hub_config(repo_id: str, filename: str) -> dict[str, Any] | None:
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


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"runtime.device is {name!r} but torch sees no CUDA device here")
    return name


def check_cuda(gpu_ids: list[str], device: str, node: str) -> None:
    """An actor that Ray gave GPUs must be able to use them: with ``runtime.device: auto`` a torch
    that sees no CUDA (a CPU build, or no driver) would compute on the CPU while the GPUs idle."""
    if not gpu_ids or device != "auto":
        return
    import torch

    if torch.cuda.is_available():
        return
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    why = ("install a CUDA build of torch on the nodes" if not torch.version.cuda else
           "check the NVIDIA driver on that node (nvidia-smi), or that CUDA_VISIBLE_DEVICES names real devices")
    raise ModelError(
        f"Ray gave an actor on {node} GPU(s) {', '.join(gpu_ids)}, but torch cannot use CUDA there: torch "
        f"{torch.__version__} is {build}, torch.cuda.device_count() is {torch.cuda.device_count()}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}. Fix: {why}; or set "
        "runtime.device: cpu to compute on the CPU on purpose (runtime.num_gpus then only reserves the GPUs)."
    )


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def register_architectures() -> None:
    """Architectures rayinfer adds to transformers' Auto classes (NEZHA, dropped by 5.x)."""
    from rayinfer.nezha import register

    register()


def load_tokenizer(ctx: LoadContext, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    register_architectures()
    try:
        return AutoTokenizer.from_pretrained(ctx.model, trust_remote_code=ctx.trust_remote_code, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {ctx.model!r}: {exc}") from None


def load_model(ctx: LoadContext, auto_class: Any, head: tuple[str, str] | None = None, **kwargs: Any) -> Any:
    """Load ``auto_class`` from ``ctx.model`` onto the device, in eval mode, with the adapter
    (merged unless ``ctx.merge_adapter`` is false). Safetensors are preferred by transformers;
    pickle ``.bin`` files load with ``weights_only=True``.

    ``head`` = (weight-name fragment, what it is): refuse a checkpoint without those weights
    instead of running a randomly initialised head (e.g. an NSP head on a RoBERTa)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    register_architectures()
    device = resolve_device(ctx.device)
    dtype = resolve_dtype(ctx.dtype, device)
    if ctx.num_threads:
        torch.set_num_threads(ctx.num_threads)
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs["output_loading_info"] = True
    try:
        model, info = auto_class.from_pretrained(ctx.model, dtype=dtype, trust_remote_code=ctx.trust_remote_code, **kwargs)
    except (ValueError, TypeError) as exc:
        if "attn_implementation" in str(exc) or "sdpa" in str(exc).lower():
            kwargs.pop("attn_implementation", None)
            model, info = auto_class.from_pretrained(
                ctx.model, dtype=dtype, trust_remote_code=ctx.trust_remote_code, **kwargs
            )
        else:
            raise ModelError(f"cannot load {ctx.model!r} as {auto_class.__name__}: {exc}") from None
    except OSError as exc:
        raise ModelError(f"cannot load {ctx.model!r}: {exc}") from None
    if head is not None:
        missing = [k for k in info.get("missing_keys", ()) if head[0] in k]
        if missing:
            raise ModelError(
                f"{ctx.model!r} has no trained {head[1]} (missing {', '.join(sorted(missing)[:3])}); "
                "its outputs would be random"
            )
    if ctx.adapter:
        model = attach_adapter(model, ctx.adapter, merge=ctx.merge_adapter)
    model.to(device)
    model.eval()
    return model


def attach_adapter(model: Any, adapter: str, merge: bool = True) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as exc:
        raise ModelError(f"cannot load adapter {adapter!r} onto {type(model).__name__}: {exc}") from None
    return peft_model.merge_and_unload() if merge else peft_model
