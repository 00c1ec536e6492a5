"""Admission: can the cluster hold the actor pool at all? Checked once Ray is up, before any row
is read, so that an impossible pool fails with one line instead of waiting forever.

Actors read their own work units (see ``rayinfer.run.unit``), so no read task competes with
them for CPUs: a pool fits when its actors fit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from rayinfer.errors import InputError, RunError
from rayinfer.io.location import local_path
from rayinfer.models.load import WEIGHTS_SHARE
from rayinfer.models.memory import MemoryNeed, gb, params_text
from rayinfer.plan.job import Plan

log = logging.getLogger("rayinfer")


DECODE_ACTOR_CPUS = 8  # most CPUs a decoding task's actor takes by default (torch scales poorly past ~8 threads)


def placed(plan: Plan, nodes: list[dict[str, float]]) -> Plan:
    """``plan`` with ``runtime.num_gpus`` and ``runtime.num_cpus`` resolved where the spec leaves
    them unset. GPUs: ``default_gpus``. CPUs: 1 per actor, but a decoding task on CPUs gets the
    CPUs of the largest node (up to DECODE_ACTOR_CPUS), as one actor decoding big batches on all
    cores beats several decoding small ones on one each."""
    rt = plan.spec.runtime
    update: dict[str, float] = {}
    device = rt.device if rt.engine == "torch" else "cpu"  # onnxruntime computes on CPUs
    gpus = rt.num_gpus if rt.num_gpus is not None else default_gpus(device, nodes)
    if rt.num_gpus is None:
        update["num_gpus"] = gpus
    if rt.num_cpus is None:
        cpus = 1.0
        if plan.task_cls.decodes and gpus == 0:
            cpus = float(max(1, min(DECODE_ACTOR_CPUS, int(max((n.get("CPU", 0) for n in nodes), default=1)))))
        update["num_cpus"] = cpus
    if not update:
        return plan
    runtime = rt.model_copy(update=update)
    return dataclasses.replace(plan, spec=plan.spec.model_copy(update={"runtime": runtime}))


def default_gpus(device: str, nodes: list[dict[str, float]]) -> float:
    """``runtime.num_gpus`` unset: one GPU per actor where a node has a whole GPU, unless
    ``runtime.device`` is cpu; else none. (An actor computes only on the GPUs Ray gave it: left at
    0 on a GPU node, the pool would start an actor per CPU, every one on CPU-sized batches.)"""
    return 1.0 if device != "cpu" and any(n.get("GPU", 0) >= 1 for n in nodes) else 0.0


def gpu_choice(rt: Any, placed_gpus: float, nodes: list[dict[str, float]]) -> str | None:
    """The line that says what an unset ``runtime.num_gpus`` became, where the cluster has GPUs
    (None elsewhere: on a CPU-only cluster 0 is all it can be)."""
    total = sum(n.get("GPU", 0) for n in nodes)
    if rt.num_gpus is not None or not total:
        return None
    if placed_gpus:
        return (f"runtime.num_gpus unset: {placed_gpus:g} GPU per actor (the cluster has {total:g}); set "
                "runtime.num_gpus: 0.5 to put two actors on each GPU, or runtime.device: cpu to compute on CPUs")
    return f"runtime.device is cpu: the actors take no GPU (the cluster has {total:g})"


def actor_need(plan: Plan) -> dict[str, float]:
    """What one actor asks Ray for: CPUs, GPUs, custom resources (those above zero) and, where the
    model's files tell it (``Plan.memory``), its host memory in bytes, so that Ray never places
    more actors on a node than its memory holds and the pool is sized by memory too."""
    rt = plan.spec.runtime
    cpus = rt.num_cpus if rt.num_cpus is not None else 1.0  # unset until placed(): 1
    memory = plan.memory_need(rt.num_gpus)
    need = {"CPU": cpus, "GPU": rt.num_gpus or 0.0, **rt.resources, "memory": memory.host_bytes if memory else 0.0}
    return {k: v for k, v in need.items() if v > 0}


def describe(need: dict[str, float]) -> str:
    return ", ".join(f"{k}={gb(v)}" if k == "memory" else f"{k}={v:g}" for k, v in need.items())


def check_memory(plan: Plan, nodes: list[dict[str, float]]) -> None:
    """One line, before any weights load, when no node offers Ray's tasks the memory one actor
    needs: the need, the largest node's, and the fixes that apply."""
    rt = plan.spec.runtime
    need = plan.memory_need(rt.num_gpus)
    if need is None or not nodes:
        return
    largest = max(n.get("memory", 0.0) for n in nodes)
    if largest >= need.host_bytes or not any("memory" in n for n in nodes):
        return
    fixes = memory_fixes(plan, need) + [
        "a node with more memory (Ray offers its tasks what `ray start --memory` gives, by default most of the node's)"]
    raise RunError(f"no node can hold one actor: it needs about {gb(need.host_bytes)} of memory ({need.parts()}), "
                   f"the largest node offers {gb(largest)}. Fixes: {'; '.join(fixes)}")


def memory_hint(plan: Plan) -> str:
    """What a line about an actor's process killed for memory says besides: the actor's need, and
    what to change if it recurs."""
    need = plan.memory_need(plan.spec.runtime.num_gpus)
    fixes = ["fewer actors (runtime.actors)"] + (memory_fixes(plan, need) if need else []) + ["a node with more memory"]
    said = (f"an actor of this job needs about {gb(need.host_bytes)} of host memory ({need.parts()})" if need else
            "this job's actor memory is not known before its model is downloaded")
    return f"{said}; if it recurs: {'; '.join(fixes)}"


def memory_fixes(plan: Plan, need: MemoryNeed) -> list[str]:
    """What makes an actor of ``plan`` need much less host memory (a quarter of it or more), the one
    that helps most first."""
    rt = plan.spec.runtime
    fixes = []
    if rt.num_gpus or need.weights_bytes + need.working_bytes < need.host_bytes / 4:
        return fixes  # the runtime is most of it
    if need.working_bytes > need.weights_bytes:
        fixes.append(f"a smaller runtime.max_batch_tokens (its working memory: {gb(need.working_bytes)})")
    if need.dtype == "float32" and need.weights_bytes >= need.working_bytes:
        fixes.append("runtime.dtype: bfloat16 (half the weights; fast where the CPU has avx512_bf16 or AMX: "
                     + ("this one has)" if _cpu_has_bf16() else "this one has not)"))
    fixes.append("a GPU (runtime.num_gpus: 1: the weights and working memory go to it)")
    return fixes


GPU_ROOM = 0.9  # of a GPU's memory, what an actor's weights and working memory may take (CUDA's context, the allocator)
GPU_PROBE_TIMEOUT_S = 60.0  # how long the run waits for a GPU to say its memory (every GPU busy: not checked)
GPU_SURE_FIT = 8e9  # a need under this share of a GPU fits any data-centre GPU: no probe


def check_gpu_memory(plan: Plan, gpu: tuple[str, int] | None) -> None:
    """One line, before any weights load, when one actor's model does not fit the GPU memory it is
    given: ``gpu`` is a GPU of the cluster, (its name, its total bytes), from ``probe_gpu``."""
    rt = plan.spec.runtime
    need = plan.memory_need(rt.num_gpus)
    if not rt.num_gpus or need is None or not need.on_gpu or gpu is None:
        return
    name, total = gpu
    share, gpus = min(1.0, rt.num_gpus), max(1.0, rt.num_gpus)
    per_gpu, usable = need.gpu_bytes(rt.num_gpus), total * min(1.0, rt.num_gpus) * GPU_ROOM
    if per_gpu <= usable and (gpus == 1 or need.weights_bytes / gpus <= total * WEIGHTS_SHARE):
        return
    fixes = []
    if need.dtype == "float32":
        fixes.append("runtime.dtype: bfloat16 (half the weights)")
    if share < 1:
        fixes.append("a whole GPU per actor (runtime.num_gpus: 1)")
    spread = max(2, -(-need.weights_bytes // int(total * WEIGHTS_SHARE)))  # placement fills each to WEIGHTS_SHARE
    if gpus < spread <= 8:
        fixes.append(f"runtime.num_gpus: {spread} (the model across {spread} GPUs of a node)")
    if need.gpu_working_bytes > 0.2 * per_gpu:
        fixes.append(f"a smaller runtime.max_batch_tokens (its working memory: {gb(need.gpu_working_bytes)})")
    fixes.append("GPUs with more memory")
    given = f"{share:g} of a GPU" if share < 1 else ("each of its GPUs" if gpus > 1 else "its GPU")
    raise RunError(
        f"one actor's model does not fit the GPU memory it gets: it needs about {gb(per_gpu)} per GPU (weights "
        f"{gb(need.weights_bytes / gpus)} ({params_text(need.weights.params)} parameters in {need.dtype}"
        f"{f', across {gpus:g} GPUs' if gpus > 1 else ''}), working memory {gb(need.gpu_working_bytes)}), and "
        f"{given} holds {gb(usable)} ({name}, {gb(total)}; {GPU_ROOM:.0%} usable"
        f"{f', weights up to {WEIGHTS_SHARE:.0%} of each' if gpus > 1 else ''}). Fixes: " + "; ".join(fixes))


def probe_gpu(plan: Plan) -> tuple[str, int] | None:
    """A GPU of the cluster, (its name, its total memory in bytes), asked of a GPU node by a Ray task
    that takes one GPU, before any actor loads weights; None where the need is small enough for any
    GPU, or no GPU answers within GPU_PROBE_TIMEOUT_S (all busy), or torch there sees no CUDA (the
    actor's load says why). A cluster of several GPU kinds answers for one of them."""
    import ray

    rt = plan.spec.runtime
    need = plan.memory_need(rt.num_gpus)
    if (not rt.num_gpus or need is None or not need.on_gpu
            or need.gpu_bytes(rt.num_gpus) <= GPU_SURE_FIT * min(1.0, rt.num_gpus)):
        return None
    ref = ray.remote(num_gpus=1, num_cpus=0)(gpu_properties).remote()
    ready, _ = ray.wait([ref], timeout=GPU_PROBE_TIMEOUT_S)
    if not ready:
        ray.cancel(ref, force=True)
        log.warning("rayinfer: note: no GPU was free within %.0f s to say its memory: the model's fit is not checked "
                    "before it loads", GPU_PROBE_TIMEOUT_S)
        return None
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - a probe: the actors' own load reports what is wrong
        log.debug("rayinfer: GPU probe: %s", exc)
        return None


def gpu_properties() -> tuple[str, int] | None:
    """This process's first CUDA device: (name, total memory in bytes); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pool_size(plan: Plan, cluster: dict[str, float], can_grow: bool = True) -> tuple[int, int]:
    """The actor pool's (min, max): from the spec, or as many actors as the cluster's totals hold
    (all from the start on the embedded Ray, which holds them; from one up on a cluster, where
    other jobs may hold some for now)."""
    rt = plan.spec.runtime
    if isinstance(rt.actors, int):
        return rt.actors, rt.actors
    if rt.actors is not None:
        return rt.actors.min, rt.actors.max
    fit = max(1, int(min(cluster.get(k, 0) / v for k, v in counted(actor_need(plan), cluster).items()) + 1e-9))
    return (1 if can_grow else fit), fit


def actors_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many actors needing ``need`` the nodes hold at once (each node on its own: an actor
    cannot span nodes)."""
    return sum(int(min(n.get(k, 0) / v for k, v in counted(need, n).items()) + 1e-9) for n in nodes)


def counted(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """``need`` less its memory where ``have`` (a node's or the cluster's resources) reports none."""
    return {k: v for k, v in need.items() if k != "memory" or "memory" in have}


def check_resources(
    plan: Plan, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None, pool_min: int = 1,
    can_grow: bool = True,
) -> None:
    """Fail now, not by waiting forever, when no node can hold one actor, or when a Ray that
    cannot grow cannot hold the pool's first ``pool_min`` actors."""
    rt = plan.spec.runtime
    if rt.num_gpus and cluster.get("GPU", 0) < rt.num_gpus:
        fix = ("Set runtime.num_gpus: 0 to run on CPUs, or join a cluster with GPUs (--address)."
               if not cluster.get("GPU") else
               f"An actor holds one model on one node: set runtime.num_gpus to at most {cluster['GPU']:g} (a model "
               "larger than one GPU: see docs/cluster.md, GPUs).")
        raise RunError(f"runtime.num_gpus is {rt.num_gpus:g} but the Ray cluster has {cluster.get('GPU', 0):g} GPUs. {fix}")
    if actor_need(plan).get("CPU", 0) > cluster.get("CPU", 0):
        raise RunError(f"runtime.num_cpus is {rt.num_cpus} but the Ray cluster has {cluster.get('CPU', 0):g} CPUs")
    for name, amount in rt.resources.items():
        if cluster.get(name, 0) < amount:
            raise RunError(f"runtime.resources asks for {amount:g} {name!r} but the cluster has {cluster.get(name, 0):g}")
    if nodes:
        check_memory(plan, nodes)
    need = counted(actor_need(plan), cluster)
    if nodes and not any(all(n.get(k, 0) >= v for k, v in counted(need, n).items()) for n in nodes):
        have = "; ".join(describe({k: n.get(k, 0) for k in need}) for n in nodes)
        raise RunError(f"no node can hold one actor ({describe(need)}); nodes have: {have}")
    if nodes:
        check_pool_fits(plan, pool_min, nodes, can_grow)


def check_pool_fits(plan: Plan, pool_min: int, nodes: list[dict[str, float]], can_grow: bool) -> None:
    """The embedded Ray cannot grow: a pool it cannot hold fails now rather than waiting out
    runtime.actor_start_timeout_s. A cluster may grow (an autoscaler): there it is a warning."""
    rt = plan.spec.runtime
    need = counted(actor_need(plan), {k: 0.0 for n in nodes for k in n})
    fits = actors_that_fit(need, nodes)
    if pool_min <= fits:
        return
    msg = (
        f"runtime.actors asks for {pool_min} actors of {describe(need)} from the start; the "
        f"{'cluster' if can_grow else 'local Ray'} holds {fits}"
    )
    if not can_grow:
        raise RunError(f"{msg}. Set runtime.actors to at most {max(fits, 1)}, or {{min: 1, max: {pool_min}}}.")
    log.warning("rayinfer: warning: %s; waiting up to runtime.actor_start_timeout_s=%ss for more nodes",
                msg, rt.actor_start_timeout_s)


def _probe_paths(inputs: list[str], output: str | None) -> list[str]:
    """Run on a node: which of the local paths it cannot see (or write, for the output)."""
    missing = [p for p in inputs if not os.path.exists(p)]
    if output is None:
        return missing
    parent = Path(output)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        missing.append(f"{output} (not writable)")
    return missing


def check_paths_visible(plan: Plan, out_dir: str) -> None:
    """On a multi-node cluster, local input/output paths must be visible from every node (a
    shared file system); otherwise fail now, naming the node, rather than mid-run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    inputs = [p for p in (local_path(f.path) for f in plan.files) if p is not None]
    output = local_path(out_dir)
    if len(nodes) < 2 or (not inputs and output is None):
        return
    probe = ray.remote(num_cpus=0)(_probe_paths)
    sample = inputs[:50]  # enough to catch a node without the file system
    pending = {
        n["NodeManagerAddress"] + " " + n["NodeID"][:12]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(sample, output)
        for n in nodes
    }
    for node, ref in pending.items():
        try:
            missing = ray.get(ref, timeout=60)
        except ray.exceptions.TaskUnschedulableError:  # the node died since ray.nodes() listed it
            continue
        if missing:
            raise InputError(
                f"node {node} cannot see {', '.join(missing[:3])}: on a multi-node cluster input and output "
                "paths must be on a file system every node mounts, or object-store URIs (s3://, gs://, ...)"
            )
