"""Loading models, tokenizers and PEFT adapters in an actor: the one place that knows about
devices, dtypes and safe loading. torch/transformers are imported inside functions so that
importing this module stays cheap for the CLI."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from rayinfer.errors import ModelError
from rayinfer.models.memory import kv_bytes_per_token
from rayinfer.models.reads import converting_reads

log = logging.getLogger("rayinfer")


@dataclass(frozen=True)
class LoadContext:
    """Where and how a task loads its model; built from the job spec by the framework."""

    model: str  # a local folder or a hub id (catalog names are already resolved)
    tokenizer: str | None = None  # where the tokenizer is, when not with the model (the spec's tokenizer:)
    adapter: str | None = None
    merge_adapter: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    num_threads: int | None = None  # intra-op threads; None leaves torch's default
    gpu_share: float = 1.0  # the share of its GPU's memory the actor holds (runtime.num_gpus, up to 1)
    engine: str = "torch"  # torch | onnxruntime (runtime.engine)
    fingerprint: str | None = None  # what identifies the model's weights (and the adapter's): an export cache key
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"runtime.device is {name!r} but torch sees no CUDA device here")
    return name


def actor_context(ctx: LoadContext, gpu_ids: list[str], node: str) -> LoadContext:
    """The context a pool actor loads with: ``device: auto`` is CUDA only where Ray gave the actor
    GPUs (``gpu_ids``, from ``ray.get_gpu_ids()``), else the CPU. Ray leaves CUDA_VISIBLE_DEVICES
    unset for an actor given no GPU, so torch there sees every GPU of the node: asked whether CUDA
    is available, a CPU actor would put its model on cuda:0, which Ray never gave it."""
    check_cuda(gpu_ids, ctx.device, node)
    if ctx.device != "auto":
        return ctx
    return replace(ctx, device="cuda" if gpu_ids else "cpu")


def device_report(ctx: LoadContext) -> dict[str, Any]:
    """What an actor computes on, for the manifest: its device and dtype, and on CUDA the GPU's
    name and memory."""
    import torch

    device = resolve_device(ctx.device)
    out: dict[str, Any] = {"device": device, "dtype": str(resolve_dtype(ctx.dtype, device)).removeprefix("torch.")}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device).index or 0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        if device == "cuda" and torch.cuda.device_count() > 1:
            out["gpus"] = torch.cuda.device_count()  # the model across them (placement)
    return out


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


KV_ROOM = 0.85
"""Of the memory an actor may hold on its GPU beyond its weights, the share its decode loop's KV
cache may take: the rest is for activations (a prefill pass, the logits of every row)."""


def kv_tokens(free: int, total: int, held: int, share: float, config: Any, dtype_bytes: int) -> int:
    """Tokens of KV cache that fit: ``share`` of the GPU's ``total`` bytes, less what this process
    ``held`` already (its weights), and never more than is ``free``; KV_ROOM of that, over what one
    token's keys and values take in every layer of a model of ``config``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_token = kv_bytes_per_token(config.to_dict() if hasattr(config, "to_dict") else dict(config), dtype_bytes)
    room = min(free, int(total * share) - held) * KV_ROOM
    return max(0, int(room // per_token))


def kv_token_budget(model: Any, share: float = 1.0) -> int | None:
    """The KV tokens a decode loop of ``model`` may hold on its GPU (``kv_tokens`` from what CUDA
    says now, after the weights loaded); None off CUDA, where the token budget of the spec holds."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return kv_tokens(free, total, torch.cuda.memory_allocated(device), share, model.config, model.dtype.itemsize)


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def register_architectures() -> None:
    """Architectures rayinfer adds to transformers' Auto classes (NEZHA, dropped by 5.x)."""
    from rayinfer.models.nezha import register

    register()


def load_tokenizer(ctx: LoadContext, **kwargs: Any) -> Any:
    """The tokenizer of ``ctx.model`` (or of ``ctx.tokenizer`` where the spec names one). One that
    knows no ordinary token is refused: transformers 5 builds such an empty fallback for a folder
    without tokenizer files, and it would read every word as unknown."""
    from transformers import AutoTokenizer

    register_architectures()
    source = ctx.tokenizer or ctx.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=ctx.trust_remote_code, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {exc}") from None
    check_tokenizer_vocabulary(tokenizer, source)
    return tokenizer


def check_tokenizer_vocabulary(tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer whose vocabulary is its special tokens alone (see ``load_tokenizer``)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    if len(tokenizer) <= len(special):
        raise ModelError(
            f"the tokenizer loaded from {source!r} knows only its {len(tokenizer)} special tokens: the folder has no "
            "tokenizer files, and every word would be read as unknown. Set tokenizer: to the folder or hub id of the "
            "model it was trained from"
        )


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
    kwargs.update(placement(device))
    with converting_reads(ctx.model, dtype):
        try:
            model, info = auto_class.from_pretrained(ctx.model, dtype=dtype, trust_remote_code=ctx.trust_remote_code,
                                                     **kwargs)
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
    check_missing_weights(ctx.model, auto_class.__name__, info.get("missing_keys", ()), head,
                          bare=getattr(model, "base_model", model) is model)
    if ctx.adapter:
        model = attach_adapter(model, ctx.adapter, merge=ctx.merge_adapter)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model


WEIGHTS_SHARE = 0.6
"""An actor holding several GPUs fills each with at most this share of weights: the rest holds the
KV cache (each layer's on that layer's GPU) and activations."""


def placement(device: str) -> dict[str, Any]:
    """How ``from_pretrained`` places the weights. On CUDA straight onto the GPU (no copy kept in
    host memory on the way). An actor that Ray gave several GPUs (it sees them all: Ray sets
    CUDA_VISIBLE_DEVICES to its ids) gets the model across them with ``device_map="auto"``, each
    filled to WEIGHTS_SHARE: layers split, so memory adds up, not speed (one GPU computes at a
    time). On CPUs, nothing: transformers loads there."""
    if not device.startswith("cuda"):
        return {}
    import torch

    count = torch.cuda.device_count()
    if device != "cuda" or count < 2:
        return {"device_map": device if device != "cuda" else "cuda:0"}
    return {"device_map": "auto",
            "max_memory": {i: int(torch.cuda.get_device_properties(i).total_memory * WEIGHTS_SHARE) for i in range(count)}}


_BUFFERS = ("position_ids", "inv_freq", "num_batches_tracked", "masked_bias", "attn.bias", "token_type_ids")
"""Names of buffers a model computes itself: absent from a checkpoint, they change nothing."""


def check_missing_weights(model: str, auto_class: str, missing: Any, head: tuple[str, str] | None = None,
                          bare: bool = False) -> None:
    """Refuse a checkpoint that lacks weights the model class needs: transformers initialises them
    at random with a log line a batch job's user never reads (a classifier loaded from a bare
    encoder, a masked-LM head missing), and every output would be noise. One exception, warned
    about instead: the pooler of a ``bare`` base model (``AutoModel``), which masked-LM checkpoints
    do not have and tasks reading hidden states never use (a head on top of it, as BERT's
    classifier, does use it: there it is refused like any other weight)."""
    lost = sorted(k for k in missing if not k.endswith(_BUFFERS))
    if bare and lost and all(".pooler." in f".{k}" for k in lost):
        log.warning("rayinfer: %r has no pooler weights (%s): transformers initialised them at random, so its "
                    "pooler_output is noise (hidden states are not affected)", model, ", ".join(lost[:2]))
        return
    if not lost:
        return
    shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
    if head is not None and any(head[0] in k for k in lost):
        raise ModelError(f"{model!r} has no trained {head[1]} (missing {shown}); its outputs would be random")
    raise ModelError(
        f"{model!r} lacks weights that {auto_class} needs ({shown}): transformers would initialise them at random "
        "and the outputs would be noise. Use a checkpoint trained for this task (its config.json's architectures "
        "name the head), or the task that fits the checkpoint"
    )


def attach_adapter(model: Any, adapter: str, merge: bool = True) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as exc:
        raise ModelError(f"cannot load adapter {adapter!r} onto {type(model).__name__}: {exc}") from None
    return peft_model.merge_and_unload() if merge else peft_model
