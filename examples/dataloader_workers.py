"""torch DataLoader workers that score items with one shared model.

    python examples/dataloader_workers.py [fork|spawn]      # from the repository root

Each of the 4 workers calls ``use()`` per item (the linger keeps its hold between items): the
first worker to ask loads the model, the others attach. Prints one JSON line: loads, attaches,
whether every score equals a private model's, and the workers' pids.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.models import numpy_mlp
from examples.serving import WIDTH, request_input, shared
from modelshare.metrics import figures


class Scored(Dataset):
    """Item ``i``: the shared model's output for request ``i``, and the worker that computed it."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Any:
        with shared.use() as model:
            return torch.tensor(float(model(request_input(i)).sum()), dtype=torch.float64), os.getpid()


def main(start: str) -> None:
    loader = DataLoader(Scored(), batch_size=4, num_workers=4, multiprocessing_context=start,
                        persistent_workers=False)
    scores, pids = {}, set()
    for batch, (values, workers) in enumerate(loader):
        for j, value in enumerate(values.tolist()):
            scores[batch * 4 + j] = value
        pids.update(int(p) for p in workers)
    private = numpy_mlp(int(os.environ.get("EXAMPLE_MODEL_MIB", "32")), WIDTH)
    right = all(abs(scores[i] - float(private(request_input(i)).sum())) <= 1e-6 * max(1.0, abs(scores[i]))
                for i in range(len(Scored())))
    now = figures(shared.directory)
    print(json.dumps({"loads": now.count(shared.key, "loads"), "attaches": now.count(shared.key, "attaches"),
                      "right": right, "workers": sorted(pids)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fork")
