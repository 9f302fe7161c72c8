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

Run: ``python -m benchmarks.studies.server_calls [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import psutil

SIZES = {"1 KiB": 1 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
CALLS = {"1 KiB": 2000, "1 MiB": 200, "64 MiB": 10}


class PlusOne:
    """The model: ``x + 1``."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x + 1


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


def run(rounds: int = 5) -> dict[str, Any]:
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
    results: dict[str, Any] = {"per_call_ms": {}, "recovery_s": {}}
    for size, nbytes in SIZES.items():
        x = np.ones(nbytes // 4, dtype=np.float32)
        np.testing.assert_array_equal(ours(x), direct(x))
        np.testing.assert_array_equal(beams(x), direct(x))
        times: dict[str, list[float]] = {"direct": [], "modelshare": [], "beam": []}
        for _ in range(rounds):
            for name, call in (("direct", direct), ("modelshare", ours), ("beam", beams)):
                times[name].append(_per_call_ms(call, x, CALLS[size]))
        results["per_call_ms"][size] = {name: statistics.median(t) for name, t in times.items()}
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


def as_markdown(results: dict[str, Any]) -> str:
    lines = ["| input | direct call | modelshare server | Beam `MultiProcessShared` | overhead: modelshare / Beam "
             "| ratio |", "|---|---|---|---|---|---|"]
    for size, ms in results["per_call_ms"].items():
        ours, beams = ms["modelshare"] - ms["direct"], ms["beam"] - ms["direct"]
        lines.append(f"| {size} | {ms['direct']:.3f} ms | {ms['modelshare']:.3f} ms | {ms['beam']:.3f} ms | "
                     f"{ours:.3f} / {beams:.3f} ms | {ours / beams:.2f} |")
    rec = results["recovery_s"]
    lines += ["", f"Recovery after SIGKILL of the server: modelshare {rec['modelshare']:.2f} s, "
              f"Beam {rec['beam']:.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # Beam logs every connection retry after the SIGKILL
    print(as_markdown(run(args.rounds)))


if __name__ == "__main__":
    main()
