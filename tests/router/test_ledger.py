"""The router's ledger: typed records, atomic writes, a torn or foreign file started afresh."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from modelshare._router.ledger import LEDGER, Ledger, LedgerState, ModelRecord, Reservation


def test_records_and_reservations_round_trip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    with ledger.locked() as state:
        state.record("a--1", "a").loads += 1
        state.reservations["b--1"] = Reservation.here(123)
    read = ledger.read()
    assert read.models == {"a--1": ModelRecord("a", loads=1)}
    assert read.reservations["b--1"].bytes == 123 and read.reservations["b--1"].alive()


def test_reservations_of_dead_processes_are_dropped(tmp_path: Path) -> None:
    state = LedgerState(reservations={"x--1": Reservation(os.getpid(), 0.0, 1),  # a reused pid: not us
                                      "y--1": Reservation.here(2)})
    assert list(state.live_reservations()) == ["y--1"] and list(state.reservations) == ["y--1"]


def test_unreadable_ledgers_start_afresh(tmp_path: Path) -> None:
    for junk in (b"{", b"[1, 2]", b'{"models": {"a--1": {"key": "a", "colour": "red"}}}', b"\xff\xfe"):
        (tmp_path / LEDGER).write_bytes(junk)
        assert Ledger(tmp_path).read() == LedgerState()


def _write_forever(directory: str, ready: object) -> None:
    ledger = Ledger(Path(directory))
    n = 0
    while True:
        with ledger.locked() as state:
            for i in range(200):
                state.record(f"k{i}--1", f"k{i}").hits = n
        n += 1
        if n == 3:
            ready.set()  # type: ignore[attr-defined]


def test_a_writer_sigkilled_mid_write_never_leaves_a_torn_ledger(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    for _ in range(20):
        ready = ctx.Event()
        writer = ctx.Process(target=_write_forever, args=(str(tmp_path), ready))
        writer.start()
        assert ready.wait(60)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        state = Ledger(tmp_path).read()
        assert len(state.models) == 200, "every write is whole: the rename is atomic"
