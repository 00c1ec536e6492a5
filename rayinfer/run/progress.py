"""What actors tell the driver, and how the driver shows it.

Actors send ``WorkReport``s (rows done, errors, tokens, parts committed) about once a second and
at every commit; the driver adds them up in ``RunTotals`` (error budget, manifest) and hands a
snapshot to one progress channel: a callable, or ``TerminalProgress`` (an updating bar on a
terminal, a plain line every ``LOG_EVERY_S`` seconds otherwise).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import pyarrow as pa

LOG_EVERY_S = 10.0


@dataclass
class WorkReport:
    """An actor's work since its last report. ``parts`` lists the parts committed in it."""

    actor: str
    rows: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0
    parts: list[str] = field(default_factory=list)
    committed_rows: int = 0
    ready_at: float = 0.0
    at: float = 0.0
    peak_rss_mb: float = 0.0
    rss_mb: float = 0.0  # now, not the peak: what a leak shows up in

    def to_table(self) -> pa.Table:
        row = asdict(self)
        row["error_kinds"] = json.dumps(row["error_kinds"])
        row["parts"] = json.dumps(row["parts"])
        return pa.Table.from_pylist([row])

    @classmethod
    def from_table(cls, table: pa.Table) -> list["WorkReport"]:
        out = []
        for row in table.to_pylist():
            row["error_kinds"] = json.loads(row["error_kinds"])
            row["parts"] = json.loads(row["parts"])
            out.append(cls(**row))
        return out


@dataclass
class RunTotals:
    """The driver's sum of every WorkReport of a run."""

    todo: int
    started: float = field(default_factory=time.time)
    rows: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    tokens: int = 0
    padded_tokens: int = 0
    parts: int = 0
    committed_rows: int = 0
    worker_deaths: int = 0  # actor processes that died mid-unit or loading (set at the end from the coordinator)
    memory_kills: int = 0  # of those, the ones Ray's memory monitor killed (watchers.DeathWatcher)
    first_commit_at: float | None = None
    actor_rows: Counter = field(default_factory=Counter)
    actor_busy_s: Counter = field(default_factory=Counter)
    actor_ready_at: dict[str, float] = field(default_factory=dict)
    actor_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    actor_rss_mb: dict[str, float] = field(default_factory=dict)
    actor_gpu_ids: dict[str, list[str]] = field(default_factory=dict)  # every actor started (from the coordinator)
    actor_devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... and what it computed on
    device_failures: list[dict[str, str]] = field(default_factory=list)  # sticky device errors that ended actors

    def add(self, r: WorkReport) -> None:
        self.rows += r.rows
        self.errors += r.errors
        self.error_kinds.update(r.error_kinds)
        self.tokens += r.tokens
        self.padded_tokens += r.padded_tokens
        self.parts += len(r.parts)
        self.committed_rows += r.committed_rows
        if r.parts:
            self.first_commit_at = r.at if self.first_commit_at is None else min(self.first_commit_at, r.at)
        self.actor_rows[r.actor] += r.committed_rows
        self.actor_busy_s[r.actor] += r.busy_s
        self.actor_ready_at[r.actor] = r.ready_at
        self.actor_peak_rss_mb[r.actor] = max(self.actor_peak_rss_mb.get(r.actor, 0.0), r.peak_rss_mb)
        self.actor_rss_mb[r.actor] = r.rss_mb

    def snapshot(self) -> dict[str, Any]:
        """What a progress channel receives: rows done of todo, rates, errors, ETA."""
        elapsed = max(1e-9, time.time() - self.started)
        rate = self.rows / elapsed
        return {
            "rows": self.rows, "todo": self.todo, "committed_rows": self.committed_rows, "parts": self.parts,
            "errors": self.errors, "elapsed_s": elapsed, "rows_per_s": rate, "tokens_per_s": self.tokens / elapsed,
            "eta_s": (self.todo - self.rows) / rate if rate > 0 else None, "actors": len(self.actor_ready_at),
            "actor_rss_mb": dict(self.actor_rss_mb),
        }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def describe(s: dict[str, Any]) -> str:
    """One line: rows done/total, %, rows/s, tokens/s, errors, committed parts, ETA; or, while the
    pool's actors load the model (``s["loading"]``: LoadWatcher), how many and for how long."""
    if s.get("loading"):
        load = s["loading"]
        return (f"{load['actors'] - load['ready']} of {load['actors']} actors loading the model, "
                f"{_duration(load['for_s'])}; {s['todo']} rows to do")
    return (f"{s['rows']}/{s['todo']} rows ({s['rows'] / max(1, s['todo']):.0%}), {s['rows_per_s']:.1f} rows/s, "
            f"{s['tokens_per_s']:.0f} tokens/s, {s['errors']} errors, {s['parts']} parts committed, "
            f"{s['actors']} actors, ETA {_duration(s['eta_s'])}")


class TerminalProgress:
    """rayinfer's own progress channel: a tqdm bar on a terminal, a log line every LOG_EVERY_S
    seconds elsewhere (a job log, CI), so that logs do not fill with bar redraws."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._bar: Any = None
        self._last = 0.0
        self._done = False  # the line for all rows is printed once (parts may still commit after it)
        self._loading = False  # the last snapshot said actors were loading

    def __call__(self, s: dict[str, Any]) -> None:
        loading = bool(s.get("loading"))
        if self.tty:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=s["todo"], unit="row", file=self.stream, dynamic_ncols=True, desc="rayinfer")
            if loading:
                self._bar.set_postfix_str(describe(s).split(";")[0], refresh=True)
                return
            self._bar.update(s["rows"] - self._bar.n)
            self._bar.set_postfix_str(f"{s['tokens_per_s']:.0f} tok/s, {s['errors']} errors, {s['parts']} parts",
                                      refresh=True)
            return
        now = time.monotonic()
        done = s["rows"] >= s["todo"]
        loaded = self._loading and not loading  # the first rows line after the loading ones: at once
        if (now - self._last >= LOG_EVERY_S or loaded or done) and not self._done:
            self._last, self._done = now, done
            print(f"rayinfer: {describe(s)}", file=self.stream, flush=True)
        self._loading = loading

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

