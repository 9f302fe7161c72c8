"""A SIGKILL storm against the byte budget: router users loading, holding and releasing models in
random order while some of them are SIGKILLed at random points -- mid-load, mid-publish, holding
-- and a sampler reads what the directory holds every 2 ms. The budget is a hard bound if the
largest sample never exceeds it.

Run: ``python -m benchmarks.studies.budget_storm [--seconds 60] [--users 4] [--kill-every 0.3]``.
Prints uses, kills, samples and the largest sample against the budget.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20
SIZES_MIB = (2, 3, 4, 5, 2, 3)  # six keys: room for about three at a time under 12 MiB
BUDGET = 12 * MiB


def model(mib: int, seed: int) -> dict:
    """A model of ``mib`` MiB, built privately (as loaders do) over a little time."""
    weights = np.full(mib * MiB, seed % 251, dtype=np.uint8)
    time.sleep(0.01 * mib)
    return {"w": weights, "seed": seed}


def router_user(directory: str, seed: int, uses: Any) -> None:
    """Use the router's models in a random order forever, holding each a moment; count uses."""
    from modelshare import Budget, MemoryBudgetExceeded, ModelRouter, SharedModel

    keys = [f"k{i}" for i in range(len(SIZES_MIB))]
    router = ModelRouter({k: SharedModel(functools.partial(model, SIZES_MIB[i], i), key=k, directory=directory)
                          for i, k in enumerate(keys)}, budget=Budget(host=BUDGET), wait=2.0)
    rng = random.Random(seed)
    while True:
        key = rng.choice(keys)
        try:
            with router.use(key) as held:
                assert held["seed"] == keys.index(key)
                time.sleep(rng.random() * 0.02)
            del held
            with uses.get_lock():
                uses.value += 1
        except MemoryBudgetExceeded:
            pass  # the others held it all for wait seconds: a refusal, not an overshoot


def held_bytes(directory: Path) -> int:
    """Bytes of segments, and of segments being written, in ``directory``."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if ".seg" in entry.name:
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


class Sampler:
    """``held_bytes`` every 2 ms in a thread: ``samples`` taken, ``largest`` seen."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.samples, self.largest = directory, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.largest = max(self.largest, held_bytes(self.directory))
            self.samples += 1

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Storm:
    """Router users in ``directory`` that can be started and SIGKILLed at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.spawn = multiprocessing.get_context("spawn")
        self.uses = self.spawn.Value("q", 0)
        self.users: list[Any] = []
        self.kills = 0

    def start_user(self, seed: int) -> None:
        user = self.spawn.Process(target=router_user, args=(str(self.directory), seed, self.uses), daemon=True)
        user.start()
        self.users.append(user)

    def kill_one(self, rng: random.Random) -> None:
        if self.users:
            user = self.users.pop(rng.randrange(len(self.users)))
            os.kill(user.pid, signal.SIGKILL)
            user.join(30)
            self.kills += 1

    def stop(self) -> None:
        for user in self.users:
            user.kill()
            user.join(30)
        self.users.clear()


def run(seconds: float = 60.0, users: int = 4, kill_every: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """The storm for ``seconds``: ``users`` router users kept running, one SIGKILLed (and replaced)
    every ``kill_every`` seconds on average, at a random point of whatever it was doing."""
    from modelshare import gc_segments

    rng = random.Random(seed)
    directory = Path(tempfile.mkdtemp(prefix="modelshare-storm-", dir="/dev/shm"))
    storm = Storm(directory)
    try:
        with Sampler(directory) as sampler:
            for i in range(users):
                storm.start_user(rng.randrange(1 << 30) + i)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(rng.expovariate(1 / kill_every))
                storm.kill_one(rng)
                storm.start_user(rng.randrange(1 << 30))
        storm.stop()
    finally:
        storm.stop()
        gc_segments(directory, include_warm=True)
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    return {"seconds": seconds, "users": users, "kills": storm.kills, "uses": storm.uses.value,
            "samples": sampler.samples, "largest_mib": sampler.largest / MiB, "budget_mib": BUDGET / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=0.3)
    args = parser.parse_args()
    result = run(args.seconds, args.users, args.kill_every)
    print(result)
    print("held at most {largest_mib:.2f} MiB under a {budget_mib:.0f} MiB budget: {kills} SIGKILLs, {uses} uses, "
          "{samples} samples".format(**result))


if __name__ == "__main__":
    main()
