"""What the actors of one run share: the rows in flight when a worker died, and the stop flag.

One small Ray actor per run (``Coordinator``, no CPU) holds it; the driver creates it and hands
its handle to every TaskActor.

Isolating a row that kills its worker process (a segfault in a tokenizer, an OOM kill): Ray
restarts a dead actor and runs its unit again, forever. So an actor tells the coordinator when it
starts a unit; a unit started a second time means the actor that ran it died. From then on (and
only then: it costs two calls per batch) the actor names each batch to the coordinator before
running it, so the next death is pinned on that batch. A batch that killed a worker more than
``worker_crash_retries`` times is split in halves (``crash_pieces``), and the halves are run
the same way, until the row that kills is alone: it gets a ``worker_crash`` error, every other row
its output. A unit whose rows killed more than ``max_worker_deaths`` workers ends the run: that
many deaths are a sick node or a model too big for memory, not a bad row.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

Range = tuple[int, int]  # first and last input row of a batch
Flight = tuple[str, int, int]  # a batch of a unit: its input file, and its first and last input row there


class Coordinator:
    """The run's shared state (a Ray actor in a run; a plain object in tests)."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}
        self.stop_requested = False
        self.actors: dict[str, tuple[Any, str]] = {}  # actor id -> (handle, node id)
        self.gpus: dict[str, list[str]] = {}  # actor (node:pid, as reports name it) -> Ray's GPU ids for it
        self.devices: dict[str, dict[str, Any]] = {}  # actor -> what it computes on (models.load.device_report)
        self.failures: list[dict[str, str]] = []  # sticky device errors that ended an actor
        self.lives: dict[str, dict[str, Any]] = {}  # actor id -> its process now (``loading``)
        self.deaths: list[dict[str, Any]] = []  # the pool's processes that died, in the order that was seen

    def loading(self, actor: str, node: str, pid: int, address: str = "") -> int:
        """A pool actor's process starts loading the model: the actor's first, or one Ray started
        after the last one died (Ray restarts an actor under the same id), on ``node`` (its id; its IP
        ``address``). Returns how many of the actor's processes died while loading it."""
        if actor in self.lives:
            self.deaths.append({**self.lives[actor], "actor": actor})
        self.lives[actor] = {"node": node, "pid": pid, "ready": False, "address": address}
        return sum(not d["ready"] for d in self.deaths if d["actor"] == actor)

    def ended(self) -> list[dict[str, Any]]:
        """The pool's processes that died (each followed by another of the same actor), in the
        order that was seen. ``ready``: it had loaded the model (a death while it ran a unit is
        counted by ``start`` too; one while loading only here)."""
        return list(self.deaths)

    def register(self, actor: str, handle: Any, node: str, where: str = "", gpu_ids: list[str] | None = None,
                 device: dict[str, Any] | None = None) -> None:
        """A pool actor (re)started on ``node``; ``where`` names it in the manifest, ``gpu_ids``
        are the GPUs Ray gave it (``ray.get_gpu_ids()``), ``device`` what it computes on."""
        self.actors[actor] = (handle, node)
        if actor in self.lives:
            self.lives[actor]["ready"] = True
        if where:
            self.gpus[where] = list(gpu_ids or [])
            if device is not None:
                self.devices[where] = device

    def gpu_ids(self) -> dict[str, list[str]]:
        """Every pool actor of the run, started or restarted, with the GPU ids Ray gave it."""
        return dict(self.gpus)

    def devices_of(self) -> dict[str, dict[str, Any]]:
        """Every pool actor of the run with its device and dtype (and GPU name and memory)."""
        return dict(self.devices)

    def all_actors(self) -> list[Any]:
        return [handle for handle, _ in self.actors.values()]

    def actors_on(self, nodes: list[str]) -> list[Any]:
        """The handles of the pool actors last started on ``nodes`` (each handed out once)."""
        gone = [a for a, (_, node) in self.actors.items() if node in nodes]
        return [self.actors.pop(a)[0] for a in gone]

    def start(self, unit: str) -> dict[str, Any]:
        """An actor starts ``unit``: how many times it was started before, and the batches that
        were running when its actors died, with how often each did."""
        u = self.units.setdefault(unit, {"attempts": 0, "deaths": 0, "in_flight": None, "crashes": {}})
        if u["attempts"]:  # Ray runs a unit again only when the actor running it died
            u["deaths"] += 1
            if u["in_flight"] is not None:
                u["crashes"][u["in_flight"]] = u["crashes"].get(u["in_flight"], 0) + 1
                u["in_flight"] = None
        u["attempts"] += 1
        return {"attempt": u["attempts"], "deaths": u["deaths"], "stop": self.stop_requested,
                "crashes": [[f, a, b, n] for (f, a, b), n in u["crashes"].items()]}

    def begin(self, unit: str, first: int, last: int, file: str = "") -> None:
        """Input rows ``first``..``last`` of ``file`` (one of the unit's) are about to run."""
        self.units[unit]["in_flight"] = (file, first, last)

    def end(self, unit: str) -> None:
        self.units[unit]["in_flight"] = None

    def request_stop(self) -> None:
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested

    def worker_deaths(self) -> int:
        """Processes that died running a unit (its restarts) or loading the model."""
        return sum(u["deaths"] for u in self.units.values()) + sum(not d["ready"] for d in self.deaths)

    def device_failure(self, actor: str, error: str) -> None:
        """An actor hit a sticky device error and ends its process (Ray starts a new one)."""
        self.failures.append({"actor": actor, "error": error})

    def device_failures(self) -> list[dict[str, str]]:
        return list(self.failures)


def crash_pieces(rows: list[int], crashes: dict[Range, int], retries: int) -> list[tuple[int, int, bool]]:
    """Cut a batch (its input row numbers, ascending) of a unit whose workers died: returns
    (lo, hi, kills) slices of the batch, in order. A slice whose rows were in flight at more than
    ``retries`` deaths is halved, recursively; a single row that was is returned with kills=True.

    The batch is first cut at the edges of every recorded range, so a range recorded by an earlier
    attempt is found again even where this attempt's batches start elsewhere (rows committed
    since)."""
    if not rows:
        return []
    cuts = {0, len(rows)}
    for a, b in crashes:
        cuts |= {bisect_left(rows, a), bisect_right(rows, b)}
    edges = sorted(cuts)
    out: list[tuple[int, int, bool]] = []
    for lo, hi in zip(edges, edges[1:]):
        if lo < hi:
            out += _halve(rows, lo, hi, crashes, retries)
    return out


def _halve(rows: list[int], lo: int, hi: int, crashes: dict[Range, int], retries: int) -> list[tuple[int, int, bool]]:
    if crashes.get((rows[lo], rows[hi - 1]), 0) <= retries:
        return [(lo, hi, False)]
    if hi - lo == 1:
        return [(lo, hi, True)]
    mid = (lo + hi) // 2
    return _halve(rows, lo, mid, crashes, retries) + _halve(rows, mid, hi, crashes, retries)
