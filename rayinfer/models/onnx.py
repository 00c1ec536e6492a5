"""ONNX Runtime as an engine for encoders (``runtime.engine: onnxruntime``): a model exported once
per model, adapter and versions into rayinfer's cache, and an ``InferenceSession`` over it.

The exporter is torch's own, ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript):
it is what torch maintains now, and it exports the traced graph with symbolic batch and sequence
sizes. Its older TorchScript path (``dynamo=False``) traced BERT's attention-mask handling for the
example's shapes: all-MiniLM-L6-v2's hidden states were off by up to 2.15 on other batches, where
the dynamo export stays within 6e-6 of torch (AMD EPYC, torch 2.13, onnxruntime 1.32).

Actors of one node share the cache: the first to need an export takes a file lock and writes it
into a temporary folder renamed into place when whole; the others wait on the lock, then read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from rayinfer.errors import ModelError
from rayinfer.models.catalog import home

EXPORT_VERSION = "1"  # rayinfer's way of exporting: a change makes new cache entries


def cache_key(fingerprint: str, what: str, inputs: list[str]) -> str:
    """What names an export: the weights' fingerprint, what was exported (its class and output),
    its inputs, and the versions that made and run it."""
    import onnxruntime
    import torch
    import transformers

    parts = [fingerprint, what, ",".join(inputs), torch.__version__, transformers.__version__,
             onnxruntime.__version__, EXPORT_VERSION]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def weights_identity(ctx: Any, model: Any) -> str:
    """What identifies the weights an export holds: the plan's fingerprint of the model's (and the
    adapter's) files; else the same of their local folders; else (a hub id in a task run outside a
    job) a digest of the loaded weights themselves. Never nothing: two models must not share an
    export."""
    from rayinfer.models.locate import fingerprint_folder

    if ctx.fingerprint:
        parts = [ctx.fingerprint]
    else:
        folders = [Path(f) for f in (ctx.model, ctx.adapter) if f]
        parts = [fingerprint_folder(f) for f in folders if f.is_dir()]
        if len(parts) < len(folders):
            import torch

            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            parts = [digest.hexdigest()]
    return "+".join(parts) + f"|merged={bool(ctx.merge_adapter) if ctx.adapter else None}"


def exported(model: Any, example: dict[str, Any], output: str, key: str) -> tuple[Path, bool]:
    """The ONNX file of ``model`` (called with ``example``'s tensors as keywords; ``output`` names
    the attribute of its output to keep, e.g. ``last_hidden_state``) in rayinfer's cache under
    ``key``: exported here if no process of this node has yet, else read. Returns (the file,
    whether this process exported it)."""
    root = home() / "onnx"
    folder, root_lock = root / key, root / f"{key}.lock"
    root.mkdir(parents=True, exist_ok=True)
    with root_lock.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (folder / "model.onnx").is_file():
            return folder / "model.onnx", False
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            export(model, example, output, tmp / "model.onnx")
            os.replace(tmp, folder)  # whole or not at all
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ModelError(f"runtime.engine onnxruntime: torch could not export {type(model).__name__} to ONNX "
                             f"({type(exc).__name__}: {first}); run it with runtime.engine: torch") from None
        return folder / "model.onnx", True


def export(model: Any, example: dict[str, Any], output: str, path: Path) -> None:
    """``torch.onnx.export`` with dynamo, every input's dims 0 and 1 symbolic (batch, sequence)."""
    import torch

    names = list(example)

    class Positional(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *tensors: Any) -> Any:
            return getattr(self.inner(**dict(zip(names, tensors)), return_dict=True), output)

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    try:
        with (contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.inference_mode(False),
              torch.no_grad()):
            warnings.simplefilter("ignore")
            torch.onnx.export(Positional(model).eval(), tuple(example[n] for n in names), str(path), dynamo=True,
                              input_names=names, output_names=[output], verbose=False,
                              dynamic_shapes={"tensors": tuple({0: batch, 1: sequence} for _ in names)})
    finally:
        quiet.setLevel(level)


def session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime session on the CPU, ``threads`` intra-op threads (the actor's CPUs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its graph notes are not the user's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
