"""One run per output folder at a time: a lease object in the folder, kept fresh by a heartbeat.

Two runs writing one folder destroy each other's work (an ``overwrite`` run clears the other's
temporary files and parts; two resumes commit the same rows twice). A run (or ``retry-errors``)
holds ``_rayinfer.lock`` from before it touches the folder until it has written the manifest:

- it records who holds it (run id, host, pid and the process's start time, since when) and a
  heartbeat, rewritten every ``HEARTBEAT_S`` seconds by a thread of the driver;
- on a local (or mounted) file system it is created whole and exclusively (written beside it,
  then hard-linked into place: of two runs started together exactly one creates it); object
  stores have no exclusive create that pyarrow can ask for, so there
  the lease is written, left to settle for ``SETTLE_S`` and read back: of two runs that wrote,
  both read the one written last (S3 and GCS are strongly consistent), and only its writer runs;
- a lock whose holder is gone is taken over: at once when it names a process of this host that
  no longer runs (a driver killed with ``kill -9``, then resumed), else once its heartbeat is
  ``stale_after()`` seconds old (a driver killed on another machine);
- a holder whose lease was taken over (its driver stalled past that age) learns it at its next
  heartbeat and must not write the manifest (``OutputLock.check``).

The name starts with "_" so that Parquet readers of the folder skip it, like ``_manifest.json``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from rayinfer.errors import OutputError, RunFailed
from rayinfer.io.location import local_path, redact
from rayinfer.io.store import LOCK, Store

HEARTBEAT_S = 10.0

SETTLE_S = 2.0

STALE_ENV = "RAYINFER_LOCK_STALE_S"


def stale_after() -> float:
    """Seconds without a heartbeat after which a lock held from another host is taken over
    (default 60: six missed heartbeats; ``RAYINFER_LOCK_STALE_S`` changes it)."""
    return float(os.environ.get(STALE_ENV, "60"))


def holder(store: Store) -> dict[str, Any] | None:
    """The lock's record as it is now (None: no lock). A lock that cannot be parsed (rayinfer
    writes it whole, so something else wrote it) is a record with no holder and no heartbeat: it
    is taken over at once."""
    try:
        data = store.read(LOCK)
    except (FileNotFoundError, OSError):
        return None
    try:
        record = json.loads(data.decode("utf-8"))
        return record if isinstance(record, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def is_live(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run a lock names may still be running."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        if not _process_runs(record["pid"], record.get("pid_started")):
            return False
    beat = record.get("heartbeat_at")
    return isinstance(beat, (int, float)) and (now or time.time()) - beat < stale_after()


def _process_runs(pid: int, started: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is None:
        return True
    created = _process_started(pid)
    return created is None or abs(created - started) < 1.0  # else the pid was reused


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """Who holds a lock, in words: "run R (pid P on host H) since T, last heartbeat S s ago"."""
    now = now or time.time()
    who = f"run {record.get('run_id', '?')}"
    if record.get("command") not in (None, "run"):
        who = f"{record['command']} {who}"  # retry-errors run R
    where = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
    beat = record.get("heartbeat_at")
    ago = f", last heartbeat {now - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return f"{who} ({where}) since {record.get('started_at', '?')}{ago}"


def refuse_if_held(store: Store) -> None:
    """Refuse, before Ray starts, an output folder that another live run holds."""
    record = holder(store)
    if record is not None and is_live(record):
        raise _held(store, record)


def _held(store: Store, record: dict[str, Any]) -> OutputError:
    return OutputError(
        f"output.path {redact(store.location)!r} is in use by {describe(record)}: one run writes a folder at a time. "
        f"Wait for it to finish (or stop it), or write to another output.path; a lock whose run is dead is taken "
        f"over once its heartbeat is {stale_after():.0f} s old (at once on the host it ran on)"
    )


class OutputLock:
    """The lease of one run on its output folder (``acquire`` ... ``release``)."""

    def __init__(self, store: Store, record: dict[str, Any]) -> None:
        self.store = store
        self.record = record
        self.lost: dict[str, Any] | None = None  # who took it over, if anyone did
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, store: Store, run_id: str, command: str = "run") -> "OutputLock":
        """Take the folder's lock, or raise OutputError naming the live run that holds it."""
        pid = os.getpid()
        for _ in range(5):
            current = holder(store)
            if current is not None and is_live(current):
                raise _held(store, current)
            record = {
                "run_id": run_id, "command": command, "host": socket.gethostname(), "pid": pid,
                "pid_started": _process_started(pid), "token": uuid.uuid4().hex,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat_at": time.time(),
            }
            if _take(store, current, record):
                lock = cls(store, record)
                lock._start()
                return lock
        raise OutputError(f"output.path {redact(store.location)!r}: could not take its lock (other runs kept "
                          "taking it); try again")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="rayinfer-output-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            current = holder(self.store)
            if current is not None and current.get("token") != self.record["token"]:
                self.lost = current
                return
            self.record["heartbeat_at"] = time.time()
            try:
                _rewrite(self.store, self.record)
            except OSError:  # a store that fails now and then: the next beat tries again
                pass

    def check(self) -> None:
        """Raise RunFailed if another run took the lock over (this driver stalled past the stale
        age): the folder is no longer this run's to finish."""
        if self.lost is not None:
            raise RunFailed(f"{describe(self.lost)} took over output.path {redact(self.store.location)!r} while this "
                            f"run was stalled (no heartbeat for over {stale_after():.0f} s); this run stops without "
                            "writing its manifest")

    def release(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = holder(self.store)
        if current is not None and current.get("token") == self.record["token"]:
            try:
                self.store.delete(LOCK)
            except (FileNotFoundError, OSError):
                pass

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1) + "\n").encode("utf-8")


def _rewrite(store: Store, record: dict[str, Any]) -> None:
    """Replace the lock with ``record`` whole: on a local file system through a file beside it
    (not ``.tmp/``, which the run clears when it finishes), on object stores in one PUT."""
    local = local_path(store.location)
    if local is None:
        store.put(LOCK, _encode(record))
        return
    os.replace(_beside(local, record), os.path.join(local, LOCK))


def _beside(local: str, record: dict[str, Any]) -> str:
    """``record`` written whole to a hidden file beside the lock (``is_lock`` names it); its path."""
    tmp = os.path.join(local, f".{LOCK}.{record['token']}")
    with open(tmp, "wb") as f:
        f.write(_encode(record))
    return tmp


def _take(store: Store, stale: dict[str, Any] | None, record: dict[str, Any]) -> bool:
    """Write ``record`` as the lock, replacing ``stale`` (a dead run's lock) if given; whether it
    is ours now. False: another run took it first (the caller looks again)."""
    local = local_path(store.location)
    if stale is not None:
        again = holder(store)  # the stale lock itself, not one a racing run has just written
        if again is not None and again.get("token") != stale.get("token"):
            return False
        try:
            store.delete(LOCK)
        except (FileNotFoundError, OSError):
            pass
    if local is not None:  # written whole beside it, then linked into place: exclusive, never seen half-written
        os.makedirs(local, exist_ok=True)
        tmp = _beside(local, record)
        try:
            os.link(tmp, os.path.join(local, LOCK))
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        if stale is None:
            return True
    else:
        store.put(LOCK, _encode(record))
    time.sleep(SETTLE_S)  # a racing writer's lease lands by then; the last one written wins
    back = holder(store)
    return back is not None and back.get("token") == record["token"]
