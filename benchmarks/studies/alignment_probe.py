"""Why numpy per-call times on shared views can trail a private copy: where the weights start.

The same 256 MiB numpy MLP, its weights copied to shared memory at different offsets from a page
boundary, called alternately with the private copy (which numpy's allocator places 16 bytes past
a page boundary). Run: ``python -m benchmarks.studies.alignment_probe``. Prints median ms per call.
"""

from __future__ import annotations

import mmap
import statistics
import time

import numpy as np

from ..models import NumpyMLP, numpy_mlp, sample_input


def placed(model: NumpyMLP, offset: int) -> NumpyMLP:
    """A copy of ``model`` in one shared mapping, each weight starting ``offset`` past a page."""
    stride = max(w.nbytes + b.nbytes for w, b in model.layers) + 2 * mmap.PAGESIZE
    memory = mmap.mmap(-1, len(model.layers) * stride, flags=mmap.MAP_SHARED)
    layers = []
    for i, (weight, bias) in enumerate(model.layers):
        start = i * stride + offset
        w = np.frombuffer(memory, np.float32, weight.size, start).reshape(weight.shape)
        b = np.frombuffer(memory, np.float32, bias.size, start + weight.nbytes + 64)
        w[...], b[...] = weight, bias
        layers.append((w, b))
    return NumpyMLP(layers)


def main(rounds: int = 15) -> dict[str, float]:
    private = numpy_mlp(256)
    x = sample_input()
    models = {"private (numpy heap, page+0x%x)" % (private.layers[0][0].ctypes.data % mmap.PAGESIZE): private}
    for offset in (0, 16, 64, 2048 + 16):
        models[f"shared, page+{offset}"] = placed(private, offset)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:40s} {ms:7.2f} ms")
    return medians


if __name__ == "__main__":
    main()
