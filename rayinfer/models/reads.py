"""How an actor reads a checkpoint stored in another dtype than it runs it in (a bf16 checkpoint
in fp32 on a CPU, an fp32 one in bf16), so that its load peaks at about one copy of the weights.

transformers 5 memory-maps every safetensors shard and keeps them all mapped until the last tensor
is in. Where the dtypes agree that is best: the tensors are the mapped pages themselves, no copy,
and the actors of a node share them. Where each tensor is converted on the way, the pages it was
read from stay resident beside the converted copy, and the load peaks at the converted weights
plus the whole checkpoint. Measured (AMD EPYC, 2 cores; transformers 5.25, safetensors 0.8; pages
in the page cache; peak RSS over the process's before the load, over the fp32 weights):

| 2.84B Llama shape, 6 bf16 shards (5.7 GB), loaded in fp32 (11.4 GB) | seconds | peak / weights |
|---|---|---|
| transformers by itself                                                 | 10.7 | 1.51 |
| each shard closed once its tensors are read (``release``)              | 12.5 | 1.085 |
| every tensor read with pread (safetensors' ``backend="pread"``)         | 21.8 | 1.025 |

So each file is closed as soon as its last tensor is read (its mapping, and its resident pages,
go with it): the peak is the weights plus about one shard. Where one shard is more than
SHARD_SHARE of the converted weights (a few large shards: some 7B checkpoints ship 2 of 7 GB)
that is too much, and the tensors are read with pread instead (transformers uses it on Windows
for the same reason): about one copy whatever the shards, read ~2x slower from the page cache.

The switch is transformers' module-level ``safe_open``, swapped for this load only (an actor
loads one model, in one thread; transformers' own reader threads only read); a transformers
without it loads as it does by itself.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rayinfer.models.memory import TORCH_BYTES, checkpoint_weights

SHARD_SHARE = 0.1
"""Largest shard (bytes on disk) over the weights in the dtype they run in, up to which shards are
read mapped and closed as read; above it, with pread."""


def read_plan(folder: Path, dtype: str) -> str | None:
    """How the checkpoint in ``folder`` is read when run in ``dtype``: None (as transformers does:
    the dtypes agree, or the folder says nothing), ``"release"`` or ``"pread"``."""
    weights = checkpoint_weights(folder) if folder.is_dir() else None
    if weights is None or weights.mostly_stored_in(dtype):
        return None
    shards = list(folder.glob("*.safetensors"))
    if not shards:
        return None
    largest = max(f.stat().st_size for f in shards)
    return "release" if largest <= SHARD_SHARE * weights.params * TORCH_BYTES.get(dtype, 4) else "pread"


@contextmanager
def converting_reads(model: str, dtype: Any) -> Iterator[str | None]:
    """While a model of ``model`` (a folder) loads in ``dtype``: its safetensors files read as
    ``read_plan`` says. Yields the plan."""
    import transformers.modeling_utils as mu

    plan = read_plan(Path(model), str(dtype).removeprefix("torch."))
    opener = getattr(mu, "safe_open", None)
    if plan is None or opener is None:
        yield None
        return

    def safe_open(filename: Any, framework: str = "pt", device: Any = "cpu", backend: Any = None) -> Any:
        if plan == "pread":
            return opener(filename, framework=framework, device=device, backend="pread")
        return ClosedAsRead(opener(filename, framework=framework, device=device, backend=backend))

    mu.safe_open = safe_open
    try:
        yield plan
    finally:
        mu.safe_open = opener


class ClosedAsRead:
    """A safetensors file that closes itself (its mapping gone, and with it the pages read
    through it) once each of its tensors has been read through ``get_slice(name)[...]``."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.left, self.lock = handle, set(handle.keys()), threading.Lock()

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get_slice(self, name: str) -> "_Slice":
        return _Slice(self, name, self.handle.get_slice(name))

    def read(self, name: str) -> None:
        with self.lock:
            self.left.discard(name)
            done = not self.left
        if done:
            self.__exit__(None, None, None)

    def __enter__(self) -> "ClosedAsRead":
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            handle, self.handle = self.handle, None
        if handle is not None:
            handle.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


class _Slice:
    """One tensor of a ClosedAsRead file, not read yet."""

    def __init__(self, file: ClosedAsRead, name: str, piece: Any) -> None:
        self.file, self.name, self.piece = file, name, piece

    def __getitem__(self, index: Any) -> Any:
        tensor = self.piece[index]
        self.piece = None  # it holds the file's mapping open
        self.file.read(self.name)
        return tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.piece, name)
