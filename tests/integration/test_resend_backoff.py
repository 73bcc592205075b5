"""Resends are bounded (issue 21, repro 9): with no worker consuming, the pump used to send
every unfinished chunk again every resend_after (60 s by default): 960 durable messages an hour
for a window of 16. A chunk no worker has taken is now sent again after resend_after, then
twice that, four times, at most eight times; one copy a period; counted on the run record.
Played out over a simulated hour (the run store's clock), with the default settings, on a
real Redis and on memory://."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

from tests.cleanup_runs import id_plan, start_plan
from workers.runs import Gate, RunStore
from workers.settings import Settings
from workers.window import resend_after

pytestmark = pytest.mark.integration

T0 = 1_800_000_000.0


def test_with_no_worker_an_hour_of_pumps_sends_a_bounded_number_of_messages(
        store: RunStore, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()  # the defaults: window 16, pump every 15 s, resend after 60 s
    window, every, again = (settings.max_chunks_in_flight, settings.pump_interval_seconds,
                            resend_after(settings))
    now = [T0]
    clocked = RunStore(store.client, store.prefix, clock=lambda: now[0])
    step = {"lock_ttl": settings.run_timeout_seconds, "window": window, "resend_after": again,
            "gate": Gate()}
    first = start_plan(clocked, "r1", id_plan(200), window=window, resend_after=again)
    clocked.confirm("r1", [number for number, _ in first.chunks])  # published, as Sender says
    sends: defaultdict[int, list[float]] = defaultdict(list)
    for number, _ in first.chunks:
        sends[number].append(0.0)
    t = 0.0
    while t < 3600:
        t += every
        now[0] = T0 + t
        pumped = clocked.pump("r1", "ids", **step)
        assert pumped is not None
        clocked.confirm("r1", [number for number, _ in pumped.chunks])
        for number, _ in pumped.chunks:
            sends[number].append(t)
    messages = sum(len(v) for v in sends.values())
    assert len(sends) == window  # nothing new is cut while the window is full
    assert messages <= window * 10, messages  # 960 before; 160 now (16 sent, 144 again)
    for number, times in sends.items():
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # One copy a period, the period doubling from resend_after up to eight times it.
        assert gaps and all(g > again for g in gaps), (number, gaps)
        assert gaps == sorted(gaps) and gaps[-1] <= 8 * again + every, (number, gaps)
    record = clocked.get("r1")
    assert record is not None and record.resends == messages - window
    assert record.as_dict()["resends"] == record.resends

    # A worker takes chunk 1 at last, and dies: the next pump sends it again, and its backoff
    # starts over (workers are consuming): that copy, unconsumed, goes again after twice
    # resend_after, not eight times.
    status, _ = clocked.begin_chunk("r1", 1, dict(first.chunks)[1], Gate())
    assert status == "ok"
    store.client.delete(f"{store.prefix}:run:r1:beat:1")  # its heartbeat lapsed
    t += 1
    now[0] = T0 + t
    pumped = clocked.pump("r1", "ids", **step)
    assert pumped is not None and 1 in dict(pumped.chunks)
    clocked.confirm("r1", [1])
    died_at, resent_at = t, None
    while resent_at is None and t < died_at + 8 * again:
        t += every
        now[0] = T0 + t
        pumped = clocked.pump("r1", "ids", **step)
        if pumped is not None and 1 in dict(pumped.chunks):
            resent_at = t
        clocked.confirm("r1", [n for n, _ in (pumped.chunks if pumped else [])])
    assert resent_at is not None and 2 * again < resent_at - died_at <= 2 * again + every


def test_status_shows_the_resends(store: RunStore) -> None:
    from workers.cli.render import run_summary

    now = [T0]
    clocked = RunStore(store.client, store.prefix, clock=lambda: now[0])
    start_plan(clocked, "r1", id_plan(4), window=2, resend_after=60.0)
    now[0] = T0 + 61
    clocked.pump("r1", "ids", lock_ttl=3600, window=2, resend_after=60.0, gate=Gate())
    record = clocked.get("r1")
    assert record is not None and record.resends == 2
    assert "resends       2 chunk messages sent again" in run_summary(record)


def test_a_killed_workers_chunk_is_sent_again_at_once_and_a_live_one_never(
        store: RunStore) -> None:
    """Issue 21: recovery after a worker is killed took resend_after (the hard limit + 30 s).
    A taken chunk's worker beats; the first top-up after its heartbeat lapsed sends it again,
    whatever resend_after says, and a chunk whose worker beats is never sent again, however
    long it runs."""
    now = [T0]
    clocked = RunStore(store.client, store.prefix, clock=lambda: now[0])
    step = {"lock_ttl": 3600, "window": 2, "resend_after": 60.0, "gate": Gate()}
    first = dict(start_plan(clocked, "r1", id_plan(4), window=2, resend_after=60.0).chunks)
    assert clocked.begin_chunk("r1", 1, first[1], Gate())[0] == "ok"  # killed mid-chunk
    assert clocked.begin_chunk("r1", 2, first[2], Gate())[0] == "ok"  # runs for hours
    now[0] = T0 + 1
    assert (clocked.pump("r1", "ids", **step) or pytest.fail("ended")).chunks == []
    store.client.delete(f"{store.prefix}:run:r1:beat:1")  # its TTL ran out: nobody renewed it
    pumped = clocked.pump("r1", "ids", **step)
    assert pumped is not None and [n for n, _ in pumped.chunks] == [1]
    for hours in range(1, 4):
        now[0] = T0 + 3600 * hours
        clocked.beat("r1", 2)
        again = clocked.pump("r1", "ids", **step)
        assert again is not None and 2 not in dict(again.chunks)
    # A chunk waiting for its retry (requeued) is a sent message again, not a dead worker.
    assert clocked.begin_chunk("r1", 1, first[1], Gate())[0] == "ok"
    assert clocked.requeue("r1", 1)
    store.client.delete(f"{store.prefix}:run:r1:beat:1")
    now[0] += 1
    assert 1 not in dict((clocked.pump("r1", "ids", **step) or pytest.fail("ended")).chunks)
    assert all(store.client.ttl(k) > 0 for k in store.client.scan_iter(
        match=f"{store.prefix}:run:r1:beat:*"))


def test_a_chunk_cut_but_never_published_is_sent_again_within_seconds(
        store: RunStore) -> None:
    """Issue 21, repro 10: a process killed between a top-up's cut (the window entry written)
    and its publish left a chunk no broker held, which waited out resend_after (40.6 s seen).
    Until its publisher confirms it, a chunk is only cut; unconfirmed after 5 s it is sent
    again, while a published one waits resend_after."""
    now = [T0]
    clocked = RunStore(store.client, store.prefix, clock=lambda: now[0])
    step = {"lock_ttl": 3600, "window": 2, "resend_after": 60.0, "gate": Gate()}
    first = start_plan(clocked, "r1", id_plan(4), window=2, resend_after=60.0)
    clocked.confirm("r1", [1])  # chunk 1 published; the publisher died before chunk 2
    now[0] = T0 + 5
    assert (clocked.pump("r1", "ids", **step) or pytest.fail("ended")).chunks == []
    now[0] = T0 + 6
    pumped = clocked.pump("r1", "ids", **step)
    assert pumped is not None and pumped.chunks == [(2, dict(first.chunks)[2])]
    now[0] = T0 + 59
    assert (clocked.pump("r1", "ids", **step) or pytest.fail("ended")).chunks == [(2, dict(
        first.chunks)[2])]  # resent at 6 s and not confirmed either: again after 5 s
    clocked.confirm("r1", [2])
    now[0] = T0 + 61
    assert [n for n, _ in (clocked.pump("r1", "ids", **step) or pytest.fail("x")).chunks] == [1]
