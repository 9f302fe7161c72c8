"""The server path against Beam's: per-call overhead and recovery after a SIGKILL, in one run.

A model that returns ``x + 1`` runs (a) in this process (the direct call), (b) behind
modelshare's ``share="server"`` and (c) behind Beam's ``MultiProcessShared(always_proxy=True)``
-- what ``large_model=True`` uses. For inputs of 1 KiB, 1 MiB and 64 MiB (float32 arrays) the
per-call time of each is measured in alternating rounds (the median round is reported), and the
overhead is the time over the direct call. Recovery: the server process is SIGKILLed and the
time until a call succeeds again is measured (Beam: a fresh ``MultiProcessShared`` acquire, as a
new DoFn would do; modelshare: the next call, which starts a new server). Beam's server runs as a
thread of the first process that acquires the model; here that is a separate process, as it is
for every Beam worker but the first.

Both on a quiet machine and on a loaded one -- a background process per core spinning, as on an
inference machine whose every core is busy -- in the same run, so the two conditions compare. The
in-band row is a ``bytes`` result (it travels in the pickle, not the arena).

Run: ``python -m benchmarks.studies.server_calls [--rounds 5] [--conditions quiet loaded]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import queue
import signal
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import psutil

SIZES = {"1 KiB": 1 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
CALLS = {"1 KiB": 2000, "1 MiB": 200, "64 MiB": 10, "64 MiB bytes": 5}


class PlusOne:
    """The model: ``x + 1``; ``blob(n)``: ``n`` bytes as one ``bytes`` object."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x + 1

    def blob(self, nbytes: int) -> bytes:
        return bytes(nbytes)


def _spin() -> None:
    while True:
        pass


class _Load:
    """A busy process per core for the duration of a ``with`` block (or nothing, when quiet)."""

    def __init__(self, loaded: bool) -> None:
        self.procs = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
                      for _ in range(os.cpu_count() or 1)] if loaded else []

    def __enter__(self) -> "_Load":
        for proc in self.procs:
            proc.start()
        time.sleep(1.0 if self.procs else 0.0)  # the load average climbs: the client sees a busy machine
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join()


def _host_beam_server(tag: str, folder: str, ready: Any) -> None:
    """A process that creates Beam's model server (a thread of the first process to acquire, as in a
    Beam worker), so that the benchmark process calls it across processes like every other worker."""
    _beam(tag, folder)(np.ones(1, dtype=np.float32))
    ready.set()
    while True:
        time.sleep(1)


def _per_call_ms(call: Callable[[Any], Any], x: np.ndarray, calls: int) -> float:
    call(x)  # warm: connections, arenas
    start = time.perf_counter()
    for _ in range(calls):
        call(x)
    return (time.perf_counter() - start) / calls * 1000


def _rounds(approaches: Any, x: Any, calls: int, rounds: int) -> dict[str, float]:
    """Median per-call ms of each approach over ``rounds`` alternating rounds."""
    approaches = list(approaches)
    times: dict[str, list[float]] = {name: [] for name, _ in approaches}
    for _ in range(rounds):
        for name, call in approaches:
            times[name].append(_per_call_ms(call, x, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def _beam(tag: str, folder: str) -> Any:
    from apache_beam.utils.multi_process_shared import MultiProcessShared

    return MultiProcessShared(PlusOne, tag=tag, path=folder, always_proxy=True).acquire()


def _kill(process: psutil.Process) -> None:
    process.send_signal(signal.SIGKILL)
    try:
        process.wait(10)
    except psutil.TimeoutExpired:
        pass


def _recover(kill: Callable[[], None], call: Callable[[], Any]) -> float:
    """Seconds from a SIGKILL of the server until a call succeeds again."""
    kill()
    start = time.perf_counter()
    while True:
        try:
            call()
            return time.perf_counter() - start
        except Exception:
            time.sleep(0.001)


def run(rounds: int = 5, loaded: bool = False) -> dict[str, Any]:
    from benchmarks.studies.server_calls import PlusOne  # by its importable name, even when run as __main__
    from modelshare import Server, SharedModel

    folder = tempfile.mkdtemp(prefix="modelshare-bench-calls-")
    shared = SharedModel(PlusOne, key="plus-one", share=Server(idle_exit=2.0), directory=folder)
    ours = shared.acquire()
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    host = spawn.Process(target=_host_beam_server, args=("plus-one", folder, ready), daemon=True)
    host.start()
    ready.wait(120)
    beams = _beam("plus-one", folder)
    direct = PlusOne()
    results: dict[str, Any] = {"per_call_ms": {}, "recovery_s": {}, "loaded": loaded}
    with _Load(loaded):
        for size, nbytes in SIZES.items():
            x = np.ones(nbytes // 4, dtype=np.float32)
            np.testing.assert_array_equal(ours(x), direct(x))
            np.testing.assert_array_equal(beams(x), direct(x))
            results["per_call_ms"][size] = _rounds(((n, c) for n, c in (("direct", direct), ("modelshare", ours),
                                                                        ("beam", beams))), x, CALLS[size], rounds)
        blob = 64 << 20
        assert ours.blob(blob) == beams.blob(blob) == direct.blob(blob)
        results["per_call_ms"]["64 MiB bytes"] = _rounds(
            (("direct", direct.blob), ("modelshare", ours.blob), ("beam", beams.blob)), blob, CALLS["64 MiB bytes"],
            rounds)
    x = np.ones(256, dtype=np.float32)

    def kill_ours() -> None:
        _kill(psutil.Process(ours.servers()[0]))

    results["recovery_s"]["modelshare"] = _recover(kill_ours, lambda: ours(x))
    beam_state = {"proxy": beams}

    def kill_beam() -> None:
        _kill(psutil.Process(host.pid))

    def beam_call() -> Any:
        try:
            return beam_state["proxy"](x)
        except Exception:
            beam_state["proxy"] = _beam("plus-one", folder)  # what a new DoFn's setup does
            raise

    results["recovery_s"]["beam"] = _recover(kill_beam, beam_call)
    shared.release(ours)
    return results


def as_markdown(all_results: list[dict[str, Any]]) -> str:
    lines = ["| machine | input | direct call | modelshare server | Beam `MultiProcessShared` | overhead: modelshare "
             "/ Beam | ratio |", "|---|---|---|---|---|---|---|"]
    for results in all_results:
        machine = "loaded" if results["loaded"] else "quiet"
        for size, ms in results["per_call_ms"].items():
            ours, beams = ms["modelshare"] - ms["direct"], ms["beam"] - ms["direct"]
            lines.append(f"| {machine} | {size} | {ms['direct']:.3f} ms | {ms['modelshare']:.3f} ms | "
                         f"{ms['beam']:.3f} ms | {ours:.3f} / {beams:.3f} ms | {ours / beams:.2f} |")
    lines.append("")
    for results in all_results:
        rec = results["recovery_s"]
        lines.append(f"Recovery after SIGKILL of the server ({'loaded' if results['loaded'] else 'quiet'}): "
                     f"modelshare {rec['modelshare']:.2f} s, Beam {rec['beam']:.2f} s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conditions", nargs="+", choices=["quiet", "loaded"], default=["quiet", "loaded"])
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # Beam logs every connection retry after the SIGKILL
    print(as_markdown([_run_apart(args.rounds, condition == "loaded") for condition in args.conditions]))


def _run_apart(rounds: int, loaded: bool) -> dict[str, Any]:
    """``run`` in a fresh process: what one condition's recovery left (Beam's re-made server lives in
    the process that re-acquired) does not touch the next."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    proc = spawn.Process(target=_run_into, args=(rounds, loaded, results))
    proc.start()
    while True:
        try:
            outcome = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the {'loaded' if loaded else 'quiet'} run died (exit code {proc.exitcode})")
    proc.join()
    return outcome


def _run_into(rounds: int, loaded: bool, results: Any) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    results.put(run(rounds, loaded))


if __name__ == "__main__":
    main()
