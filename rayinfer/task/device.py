"""Which failures of a forward pass belong to the device, not to the rows.

An out-of-memory belongs to the batch: a smaller one may fit, so the runner halves it as it halves
any failing batch, and a row that runs out of memory alone gets an error naming the fix. A
*sticky* CUDA error (a device-side assert, an illegal memory access, an uncorrectable ECC error)
poisons the CUDA context: every later call in that process fails the same way, so halving would
turn the rest of the actor's work into error rows. The runner raises ``DeviceFailure`` instead;
the actor then ends its process (``rayinfer.run.actor``), Ray starts a new one, and the batch is
retried under the worker-crash rules: run again, then halved under watch until a row that keeps
killing its worker is alone (a bad token id behind a device-side assert is such a row).
"""

from __future__ import annotations

from rayinfer.errors import RayInferError, RowError

STICKY = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "uncorrectable ECC error",
    "unspecified launch failure",
    "the launch timed out and was terminated",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)
OOM = ("CUDA out of memory", "out of memory", "DefaultCPUAllocator: can't allocate memory")


class DeviceFailure(RayInferError):
    """A sticky device error: the process's CUDA context is unusable; the actor must end."""


def is_sticky(exc: BaseException) -> bool:
    """A CUDA error after which no call in this process can succeed (an out-of-memory is not one:
    ask ``is_out_of_memory`` first)."""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in STICKY)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in OOM))


def free_cached_memory() -> None:
    """After an out-of-memory on CUDA: hand the allocator's cached blocks back before the halves run."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def triage(exc: BaseException, stage: str) -> bool:
    """What a failed call means for the calls after it: True for an out-of-memory (the allocator's
    cache handed back: smaller calls may pass); a sticky device error is raised as DeviceFailure
    (no later call in this process can pass); False for anything else. Out-of-memory is asked
    first: its messages and the sticky ones are told apart in that order."""
    if is_out_of_memory(exc):
        free_cached_memory()
        return True
    if is_sticky(exc):
        raise sticky_failure(exc, stage) from exc
    return False


def one_row_out_of_memory(exc: BaseException, stage: str) -> RowError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return RowError(f"{stage} ran out of memory on this row alone ({first}): lower runtime.max_batch_tokens (and, "
                    "for generation, options.max_new_tokens), or run on a device with more memory", "out_of_memory")


def sticky_failure(exc: BaseException, stage: str) -> DeviceFailure:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return DeviceFailure(f"{stage} hit a device error that no later call in this process survives "
                         f"({type(exc).__name__}: {first}): the actor ends and Ray starts a new one")
