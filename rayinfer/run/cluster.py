"""Starting (or joining) Ray, and the Ray Data graph of a run: one unit per block, mapped by a
pool of TaskActors (rayinfer/run/actor.py), each given the plan's settings for its unit loop."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from rayinfer.plan.job import Plan
from rayinfer.run.actor import TaskActor
from rayinfer.run.admission import actor_need, memory_hint
from rayinfer.run.coordinator import Coordinator
from rayinfer.run.unit import UnitSettings
from rayinfer.spec import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS


def init_ray(address: str | None) -> bool:
    """Join ``address``, or start the embedded local Ray; True when this started a local one
    (which, unlike a cluster, never grows)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray takes SIGTERM over in the driver (a stack dump, then death); keep the caller's handlers
    # (`rayinfer run` stops cleanly on SIGTERM and Ctrl-C: exit 130 and how to resume)
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            return False
        # the embedded Ray is this process's own, on 127.0.0.1: its token-auth notice is for clusters
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        return True
    finally:
        for sig, handler in handlers.items():
            if callable(handler) and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def start_coordinator() -> Any:
    """The run's Coordinator actor, on the driver's node (whose loss ends the run anyway; placed
    elsewhere, soft affinity let it land on a node whose loss then failed every actor's call)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver has no node of its own
        node = None
    where = NodeAffinitySchedulingStrategy(node, soft=False) if node else None
    return ray.remote(Coordinator).options(num_cpus=0, max_restarts=0, scheduling_strategy=where).remote()


def default_batch_tokens(plan: Plan) -> int:
    """The token budget per forward pass when the spec sets none: large on GPUs; on CPUs small
    for encoders (bigger passes run slower there) but large for generation, whose decode steps
    cost about the same for 8 rows as for 32 (measured in benchmarks/)."""
    if plan.spec.runtime.num_gpus:
        return GPU_BATCH_TOKENS
    return plan.task_cls.cpu_batch_tokens or CPU_BATCH_TOKENS


CPU_DECODE_ROWS = 32
"""Rows per decode loop of a decoding task on CPU actors: SmolLM2, 48 chat prompts x 128 new
tokens, 2 threads: a plain generate loop ran 59.9, 76.9 and 61.8 new tokens/s at batches of 16,
32 and 48 (benchmarks/generation.py): past 32, rows that finished early and longer attention
cost more than the fuller batch gains."""


def default_batch_rows(plan: Plan) -> int | None:
    """Rows per decode loop for a decoding task (None: cut by tokens alone, as encoders are). On
    GPUs the token budget alone bounds it (a decode step there costs about the same for 256 rows)."""
    if not plan.task_cls.decodes:
        return None
    return None if plan.spec.runtime.num_gpus else CPU_DECODE_ROWS


def actor_args(plan: Plan, out_dir: str, run_id: str) -> dict[str, Any]:
    """TaskActor's constructor arguments for a plan (but the coordinator)."""
    spec, rt = plan.spec, plan.spec.runtime
    return dict(
        task_cls=plan.task_cls,
        options=plan.options.model_dump(mode="json"),
        context=plan.load_context(num_threads=None if rt.num_gpus else max(1, math.ceil(actor_need(plan)["CPU"]))),
        runner=dict(column_map=plan.column_map, id_column=spec.input.id_column,
                    keep=[k for k in spec.input.keep if k != spec.input.id_column],
                    max_batch_tokens=rt.max_batch_tokens or default_batch_tokens(plan),
                    max_batch_rows=default_batch_rows(plan)),
        settings=UnitSettings(
            files={f.path: f for f in plan.files}, read_columns=plan.read_columns, out_dir=out_dir,
            schema=plan.output_schema, provenance=plan.provenance(run_id), part_bytes=spec.output.part_bytes,
            batch_size=rt.batch_size, on_unreadable=spec.input.on_unreadable, prefetch=bool(rt.num_gpus),
            crash_retries=rt.worker_crash_retries, max_worker_deaths=rt.max_worker_deaths,
            memory_hint=memory_hint(plan),
        ),
    )


def build_dataset(plan: Plan, units: list[dict[str, Any]], out_dir: str, run_id: str, pool: tuple[int, int],
                  coordinator: Any = None) -> Any:
    """The whole Ray Data graph: one unit per block, mapped by an actor pool, one unit at a time
    per actor (so a big unit never waits queued behind another while an actor idles)."""
    import ray.data

    rt = plan.spec.runtime
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(
        TaskActor,
        fn_constructor_kwargs={**actor_args(plan, out_dir, run_id), "coordinator": coordinator},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1], max_tasks_in_flight_per_actor=1),
        num_cpus=rt.num_cpus,
        num_gpus=rt.num_gpus or None,
        memory=actor_need(plan).get("memory"),  # the model's need, from its files (Plan.memory)
        resources=rt.resources or None,
    )


@contextmanager
def data_context(actor_start_timeout_s: int) -> Iterator[None]:
    """rayinfer's Ray Data settings for the run, restored afterwards (a user's own datasets in the
    same process keep theirs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    settings = {
        "enable_progress_bars": False,
        "print_on_execution_start": False,
        # Ray Data's default feeds the first actor that is ready and places the others later:
        # a pool of N then ran as 1 on a busy cluster.
        "wait_for_min_actors_s": actor_start_timeout_s,
        # actors yield a small report about once a second: deliver each at once, not when 128 MiB
        # of them have piled up (which, for reports, is never before the unit ends)
        "target_max_block_size": 1,
    }
    # pool {min, max}: add an actor whenever every actor is busy and units wait (Ray Data's default
    # threshold, 175%, needs two units queued per actor, which would leave the last ones unbalanced)
    settings["autoscaling_config"] = dataclasses.replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0)
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": rayinfer has its own
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
