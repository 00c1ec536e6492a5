"""Device failures end the actor, not the rows: a sticky CUDA error (raised here from a task's
forward with the type and message CUDA gives, as this machine has no GPU) is not halved into error
rows but ends the actor's process, and Ray's replacement runs the batch again; an out-of-memory is
halved as any failure is, down to an error row naming the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
from helpers import fill_mask_job, masked_corpus
from rayinfer_tasks.fill_mask import FillMaskTask

from rayinfer.api import run_job
from rayinfer.models.load import LoadContext
from rayinfer.task.device import DeviceFailure
from rayinfer.task.registry import Registry, load_registry
from rayinfer.task.runner import BatchStats, TaskRunner
from rayinfer.testing import run_task

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors get the task class below by value

ILLEGAL_ADDRESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                   "reported at some other API call, so the stacktrace below might be incorrect.")
OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.21 GiB is free.")


class DeviceTroubleFillMask(FillMaskTask):
    """fill-mask whose forward fails as CUDA does: with an illegal memory access on a batch
    holding a STICKY row while ``flag`` does not exist (it is created then: the fault is the
    device's, once), and out of memory on any batch holding an OUT-OF-MEMORY row."""

    name = "device-trouble-fill-mask"
    description = "fill-mask with CUDA's failures"
    flag = ""

    def preprocess(self, batch):
        marks = ["oom" if "OUT-OF-MEMORY" in (t or "") else "sticky" if "STICKY" in (t or "") else None
                 for t in batch["text"]]
        return [{**item, "mark": mark} if isinstance(item, dict) else item
                for item, mark in zip(super().preprocess(batch), marks)]

    def forward(self, items):
        marks = {item["mark"] for item in items}
        if "oom" in marks:
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        if "sticky" in marks and not Path(self.flag).exists():
            Path(self.flag).touch()
            raise torch.AcceleratorError(ILLEGAL_ADDRESS)
        return super().forward([{k: v for k, v in item.items() if k != "mark"} for item in items])


def registry() -> Registry:
    base = load_registry()
    return Registry({**base.tasks, DeviceTroubleFillMask.name: DeviceTroubleFillMask},
                    {**base.task_plugin, DeviceTroubleFillMask.name: "tests"}, base.plugins)


def test_a_sticky_error_is_raised_at_once_and_an_out_of_memory_is_halved_to_its_row(tmp_path, rayinfer_bert):
    """Without Ray: the first forward's sticky error is a DeviceFailure (one call, no halving:
    every later call in that process would fail too); a row that runs out of memory alone is an
    out_of_memory error row naming the fix, its batch's other rows their outputs."""
    DeviceTroubleFillMask.flag = str(tmp_path / "flag")
    task = DeviceTroubleFillMask(DeviceTroubleFillMask.Options(top_k=2), LoadContext(model=str(rayinfer_bert)))
    task.load()
    calls = []
    forward = task.forward
    task.forward = lambda items: calls.append(len(items)) or forward(items)
    runner = TaskRunner(task, max_batch_tokens=1 << 20)
    texts = masked_corpus(8)["sentence"]
    with pytest.raises(DeviceFailure, match=r"forward hit a device error that no later call in this process survives "
                                            r"\(AcceleratorError: CUDA error: an illegal memory access was encountered\)"):
        runner.run({"text": texts[:3] + ["STICKY " + texts[3]] + texts[4:]})
    assert calls == [8]

    calls.clear()
    stats = BatchStats()
    batch = texts[:5] + ["OUT-OF-MEMORY " + texts[5]] + texts[6:]
    out, errors = runner.run({"text": batch}, stats)
    assert [e.kind if e else None for e in errors] == [None] * 5 + ["out_of_memory"] + [None] * 2
    assert errors[5].message.startswith(f"forward ran out of memory on this row alone ({OUT_OF_MEMORY.splitlines()[0]}")
    assert "lower runtime.max_batch_tokens (and, for generation, options.max_new_tokens)" in errors[5].message
    assert sorted(calls) == [1, 1, 2, 2, 4, 4, 8]  # halved down to the row, as any failure is
    direct = run_task(FillMaskTask, [{"text": t} for i, t in enumerate(batch) if i != 5], rayinfer_bert, {"top_k": 2})
    assert [f for i, f in enumerate(out["filled"]) if i != 5] == [d["filled"] for d in direct]


def test_a_sticky_device_error_ends_the_actor_and_every_row_comes_out_once(tmp_path, rayinfer_bert, ray_session):
    """A job on the embedded Ray: the actor that hits the illegal memory access ends its process
    (a log line, the manifest's device_failures), Ray starts another, which runs the unit again;
    the row that runs out of memory alone is the one error row; every row is there once, and every
    other row's output is the task's on that text, run directly."""
    DeviceTroubleFillMask.flag = str(tmp_path / "flag")
    corpus = masked_corpus(60)
    corpus["sentence"][17] = "STICKY " + corpus["sentence"][17]
    corpus["sentence"][41] = "OUT-OF-MEMORY " + corpus["sentence"][41]
    job = fill_mask_job(tmp_path, rayinfer_bert, corpus=corpus, files=1, task=DeviceTroubleFillMask.name,
                        runtime={"batch_size": 8, "actors": 1}, options={"top_k": 2})
    manifest = run_job(job, registry=registry())
    assert manifest["rows"] == 60 and manifest["errors_this_run_by_kind"] == {"out_of_memory": 1}
    assert manifest["worker_deaths"] == 1
    [failure] = manifest["device_failures"]
    assert "forward hit a device error that no later call in this process survives (AcceleratorError: CUDA error: " \
           "an illegal memory access was encountered): the actor ends and Ray starts a new one" in failure["error"]
    assert failure["actor"] in manifest["actor_devices"] and len(manifest["actor_devices"]) == 2  # it and its successor
    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == corpus["doc_id"]
    assert rows[1041]["error"].startswith("forward ran out of memory on this row alone")
    good = [i for i in range(60) if i != 41]
    direct = run_task(FillMaskTask, [{"text": corpus["sentence"][i]} for i in good], rayinfer_bert, {"top_k": 2})
    assert [rows[corpus["doc_id"][i]]["filled"] for i in good] == [d["filled"] for d in direct]
    assert all(rows[corpus["doc_id"][i]]["error"] is None for i in good)


def test_a_decode_loops_kv_cache_is_sized_by_the_gpus_memory_and_the_actors_share(tmp_path, rayinfer_bert):
    """On a GPU the decode loop's KV slots come from the memory the actor may hold there (its
    runtime.num_gpus share of the GPU, less its weights, never more than is free), not from the
    16,384-token budget of an encoder's forward pass (22 chat rows of 728 tokens on an 80 GiB H100)."""
    from transformers import AutoConfig

    from rayinfer.api import plan_job
    from rayinfer.models.load import KV_ROOM, kv_tokens

    config = AutoConfig.from_pretrained(Path(__file__).parent.parent / "benchmarks" / "gpu_models" / "smollm2-135m")
    per_token = 2 * 30 * 3 * 64 * 2  # layers x KV heads x head dim, keys and values, bf16: 23,040 bytes
    gib, weights = 2**30, int(0.27 * 2**30)
    whole = kv_tokens(79 * gib, 80 * gib, weights, 1.0, config, 2)
    assert whole == int(79 * gib * KV_ROOM // per_token) and whole // 728 > 3800  # rows of 600 + 128 tokens
    assert kv_tokens(79 * gib, 80 * gib, weights, 0.5, config, 2) == int((40 * gib - weights) * KV_ROOM // per_token)
    assert kv_tokens(2 * gib, 80 * gib, weights, 1.0, config, 2) == int(2 * gib * KV_ROOM // per_token)  # others hold it
    assert kv_tokens(gib, 8 * gib, 9 * gib, 1.0, config, 2) == 0
    shares = [plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime=rt)).load_context().gpu_share
              for rt in ({"num_gpus": 0.5}, {"num_gpus": 2}, {})]
    assert shares == [0.5, 1.0, 1.0]
