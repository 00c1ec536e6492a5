"""Isolating a row that kills its worker: the coordinator's bookkeeping and the halving, without
Ray (the end-to-end run with a task that kills its process is in test_faults.py)."""

from __future__ import annotations

import random

from rayinfer.run.coordinator import Coordinator, crash_pieces



def test_a_process_that_dies_loading_the_model_counts_as_a_worker_death_once():
    """Ray restarts a dead actor under its id; its next process tells the coordinator it loads.
    A process that died before it registered (loaded) is a death only the coordinator sees; one
    that died while running a unit is counted by the unit's restart, not twice."""
    c = Coordinator()
    assert c.loading("a", "n1", 10) == 0 and c.loading("b", "n1", 11) == 0
    c.register("b", None, "n1", "n1:11")  # b loaded
    assert c.ended() == [] and c.worker_deaths() == 0
    assert c.loading("a", "n1", 12) == 1  # a's first process died loading
    assert c.loading("a", "n1", 13) == 2
    c.register("a", None, "n1", "n1:13")
    assert c.ended() == [{"node": "n1", "pid": 10, "ready": False, "address": "", "actor": "a"},
                         {"node": "n1", "pid": 12, "ready": False, "address": "", "actor": "a"}]
    c.start("u")
    c.start("u")  # b died running u: the unit's restart counts it
    assert c.loading("b", "n1", 14) == 0  # and b's next process knows no load death
    assert c.ended()[-1] == {"node": "n1", "pid": 11, "ready": True, "address": "", "actor": "b"}
    assert c.loading("a", "n1", 15) == 2 and c.ended()[-1]["pid"] == 13  # in the order seen, whichever actor
    assert c.worker_deaths() == 3

def test_a_unit_started_again_counts_a_death_and_pins_it_on_the_batch_in_flight():
    c = Coordinator()
    first = c.start("f:0-100")
    assert first == {"attempt": 1, "deaths": 0, "stop": False, "crashes": []}
    # the first attempt runs unwatched: its death is counted but pinned on nothing
    assert c.start("f:0-100") == {"attempt": 2, "deaths": 1, "stop": False, "crashes": []}
    c.begin("f:0-100", 0, 7)
    c.end("f:0-100")
    c.begin("f:0-100", 8, 15)  # dies here
    again = c.start("f:0-100")
    assert again["deaths"] == 2 and again["crashes"] == [["", 8, 15, 1]]
    c.begin("f:0-100", 8, 15)
    assert c.start("f:0-100")["crashes"] == [["", 8, 15, 2]]
    c.begin("f:0-100", 8, 15, "/d/g.parquet")  # the same rows of another file of the unit (small files packed)
    assert c.start("f:0-100")["crashes"] == [["", 8, 15, 2], ["/d/g.parquet", 8, 15, 1]]
    assert c.start("g:0-10")["attempt"] == 1 and c.worker_deaths() == 4
    c.request_stop()
    assert c.stopping() and c.start("h:0-10")["stop"]


def test_no_record_runs_the_batch_whole():
    assert crash_pieces(list(range(10, 18)), {}, 1) == [(0, 8, False)]
    assert crash_pieces([], {(1, 2): 5}, 0) == []


def test_a_batch_is_halved_only_past_the_retries():
    rows = list(range(100, 108))
    assert crash_pieces(rows, {(100, 107): 1}, 1) == [(0, 8, False)]  # one more try as it was
    assert crash_pieces(rows, {(100, 107): 2}, 1) == [(0, 4, False), (4, 8, False)]
    assert crash_pieces(rows, {(100, 107): 2, (104, 107): 2, (106, 107): 2, (107, 107): 2}, 1) == [
        (0, 4, False), (4, 6, False), (6, 7, False), (7, 8, True)]


def test_a_recorded_range_is_found_again_when_batches_start_elsewhere():
    # an earlier attempt died on rows 96-103; this attempt's batch starts at 90 (rows committed since)
    rows = list(range(90, 110))
    assert crash_pieces(rows, {(96, 103): 1}, 0) == [(0, 6, False), (6, 10, False), (10, 14, False), (14, 20, False)]
    # rows with gaps (committed rows skipped): keys are the first and last row present
    gappy = [1, 2, 5, 6, 9, 12]
    assert crash_pieces(gappy, {(1, 12): 1, (6, 12): 1, (9, 12): 1, (12, 12): 1}, 0) == [
        (0, 3, False), (3, 4, False), (4, 5, False), (5, 6, True)]


def test_isolation_converges_on_the_killing_rows_for_any_batch_and_retries():
    """Simulate whole runs: the coordinator and crash_pieces against a batch where given rows
    kill; every killing row ends alone and flagged, no other row is, and the deaths stay within
    (retries + 1) x (log2(batch) + 1) + 1 per killing row."""
    rng = random.Random(7)
    for _ in range(200):
        n, retries = rng.randint(1, 64), rng.randint(0, 2)
        killers = set(rng.sample(range(n), rng.randint(1, min(3, n))))
        c, unit, crashes, deaths = Coordinator(), "u", None, 0
        while True:
            state = c.start(unit)
            if state["attempt"] > 1:
                crashes = {(a, b): k for _, a, b, k in state["crashes"]}
            pieces = [(0, n, False)] if crashes is None else crash_pieces(list(range(n)), crashes, retries)
            died = False
            for lo, hi, kills in pieces:
                if kills:
                    continue
                if crashes is not None:
                    c.begin(unit, lo, hi - 1)
                if killers & set(range(lo, hi)):
                    died = True
                    break
                if crashes is not None:
                    c.end(unit)
            if not died:
                break
            deaths += 1
        flagged = {lo for lo, hi, kills in pieces if kills}
        assert flagged == killers, (n, retries, killers, pieces)
        assert deaths <= len(killers) * ((retries + 1) * (n.bit_length() + 1) + 1)
