"""Threads that watch a run from the driver: the stop request, nodes dying under the pool, and the pool's
actors while they load the model."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, TypeVar

from rayinfer.run.failures import worker_exits

log = logging.getLogger("rayinfer")

NODE_CHECK_S = 5.0  # how often the driver looks for nodes that died under the pool
NODE_DEATH_WAIT_S = 90.0  # after a lost worker: how long to wait for Ray to declare its node dead


class _Watcher:
    """``_watch`` on a daemon thread (named ``name``) while the ``with`` block runs, if ``active``;
    ``done`` is set on the way out, and the thread joined."""

    name = "rayinfer-watch"

    def __init__(self, active: bool = True) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name=self.name, daemon=True) if active else None

    def __enter__(self: W) -> W:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _watch(self) -> None:
        raise NotImplementedError


W = TypeVar("W", bound=_Watcher)


class StopWatcher(_Watcher):
    """While a run is on: once ``stop`` is set, tell the actors (through the coordinator) to
    commit what they hold and take no new unit; if they are not done within ``timeout_s``,
    interrupt the main thread (KeyboardInterrupt: parts still open are dropped, never half-seen)."""

    name = "rayinfer-stop"

    def __init__(self, stop: threading.Event | None, coordinator: Any, timeout_s: int) -> None:
        self.stop, self.coordinator, self.timeout_s = stop, coordinator, timeout_s
        self.stopped = False
        super().__init__(active=stop is not None)

    def _watch(self) -> None:
        assert self.stop is not None
        while not self.stop.wait(0.2):
            if self.done.is_set():
                return
        if self.done.is_set():
            return
        self.stopped = True
        self.coordinator.request_stop.remote()
        log.warning("rayinfer: stopping: the actors commit the rows they hold (up to runtime.stop_timeout_s=%ss); "
                    "interrupt again to stop at once", self.timeout_s)
        if not self.done.wait(self.timeout_s):
            log.warning("rayinfer: the actors did not finish within %ss: stopping now (parts still open are "
                        "dropped; a resume redoes their rows)", self.timeout_s)
            import _thread

            _thread.interrupt_main()


class NodeWatcher(_Watcher):
    """While a run is on, every NODE_CHECK_S: has a node with pool actors on it died? Ray would
    restart those actors elsewhere, but only where their resources are free, and the pool's other
    actors keep theirs while a unit is outstanding: a pool that filled the cluster then waited
    forever (seen on the two-node test cluster). So the dead node's actors are killed for good;
    their units fail, and ``execute`` goes on from the committed parts with a new pool."""

    name = "rayinfer-nodes"

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        super().__init__()

    def _watch(self) -> None:
        import ray

        while not self.done.wait(NODE_CHECK_S):
            try:
                dead = [n["NodeID"] for n in ray.nodes() if not n.get("Alive")]
                for handle in ray.get(self.coordinator.actors_on.remote(dead)) if dead else []:
                    log.warning("rayinfer: a node of the pool died: its actor is replaced, its open part redone")
                    ray.kill(handle, no_restart=True)
            except Exception as exc:  # Ray going down with the run: nothing left to watch
                log.debug("rayinfer: node watch: %s", exc)


def wait_for_node_death(nodes: set[str], timeout_s: float = NODE_DEATH_WAIT_S) -> None:
    """Before a new pool starts: wait until Ray has marked dead the node that was lost (it does
    after missed health checks, ~30 s), else the new pool's actors are placed on it and wait
    forever. A worker lost without its node costs the whole wait."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if nodes - {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return
        time.sleep(1.0)


LOAD_TICK_S = 1.0  # how often the progress channel hears about actors still loading


class LoadWatcher(_Watcher):
    """From the pool's start until its first actor reports work: every LOAD_TICK_S, the progress
    channel gets a snapshot saying how many of the pool's first ``actors`` are still loading the
    model, and for how long (a multi-GB model takes minutes; a rows line over no work says nothing).
    ``lock`` serialises the channel with the driver's own calls."""

    name = "rayinfer-load"

    def __init__(self, channel: Any, coordinator: Any, actors: int, totals: Any, lock: threading.Lock) -> None:
        self.channel, self.coordinator, self.actors, self.totals, self.lock = channel, coordinator, actors, totals, lock
        super().__init__(active=channel is not None)

    def _watch(self) -> None:
        import ray

        start = time.monotonic()
        while not self.done.wait(LOAD_TICK_S) and not self.totals.actor_ready_at:
            try:  # an actor registers once its model is loaded
                ready = len(ray.get(self.coordinator.gpu_ids.remote(), timeout=5))
            except Exception as exc:  # Ray going down: the main thread says why
                log.debug("rayinfer: counting the loaded actors: %s", exc)
                continue
            if ready >= self.actors:  # all loaded: the rows line follows
                return
            with self.lock:
                if not self.totals.actor_ready_at and not self.done.is_set():
                    loading = {"actors": self.actors, "ready": ready, "for_s": time.monotonic() - start}
                    self.channel({**self.totals.snapshot(), "loading": loading})


DEATH_TICK_S = 1.0  # how often the driver looks for pool processes that died
EXIT_WAIT_S = 10.0  # how long a death waits for Ray's worker table to say how the process ended


class DeathWatcher(_Watcher):
    """While a run is on: a pool actor's process that died (Ray starts another under the same
    actor, which tells the coordinator) is named in one rayinfer line where it matters: killed by
    Ray's memory monitor (the worker table's exit type NODE_OUT_OF_MEMORY), while loading the model
    or running rows, with the actor's memory need and the fixes (``hint``); any other death while
    loading, with how it ended. (A process that died running rows otherwise is the unit loop's:
    ``rayinfer.run.coordinator``.) ``totals.memory_kills`` counts the memory kills."""

    name = "rayinfer-deaths"

    def __init__(self, coordinator: Any, totals: Any, hint: str) -> None:
        self.coordinator, self.totals, self.hint = coordinator, totals, hint
        self.seen, self.pending = 0, []  # deaths not reported yet, with when they were seen
        super().__init__()

    def _watch(self) -> None:
        while not self.done.wait(DEATH_TICK_S):
            self.look()
        self.look(final=True)

    def look(self, final: bool = False) -> None:
        import ray

        try:
            ended = ray.get(self.coordinator.ended.remote(), timeout=5)
        except Exception as exc:  # Ray going down with the run: the main thread says why
            log.debug("rayinfer: death watch: %s", exc)
            return
        now = time.monotonic()
        self.pending += [(life, now) for life in ended[self.seen:]]
        self.seen = len(ended)
        if not self.pending:
            return
        exits = worker_exits({(life["node"], life["pid"]) for life, _ in self.pending})
        waiting = []
        for life, since in self.pending:
            how = exits.get((life["node"], life["pid"]))
            if how is None and not final and now - since < EXIT_WAIT_S:
                waiting.append((life, since))
            else:
                self.report(life, how)
        self.pending = waiting

    def report(self, life: dict[str, Any], how: str | None) -> None:
        doing = "while it ran rows" if life["ready"] else "while it loaded the model"
        where = f"{life.get('address') or 'node ' + life['node'][:12]} (pid {life['pid']})"
        if how == "NODE_OUT_OF_MEMORY":
            self.totals.memory_kills += 1
            log.warning("rayinfer: Ray killed an actor's process on %s for memory %s: the node's memory passed Ray's "
                        "memory-monitor threshold. Ray starts the actor again; %s", where, doing, self.hint)
        elif not life["ready"]:
            log.warning("rayinfer: an actor's process on %s died %s (%s); Ray starts the actor again", where, doing,
                        f"Ray's exit type: {how}" if how else "how it ended is not known")
