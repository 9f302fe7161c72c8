"""Scenario 3: one large model, loaded once, used by every process on the machine.

Beam's default loads a private copy in every SDK worker process; ``large_model=True`` keeps one
copy in a server process and pickles every call over a socket; modelshare keeps one copy of the
weights in shared memory and every process computes on zero-copy views. The memory-mapped file
is the peer where the framework can map its file (PyTorch, safetensors, scikit-learn through
joblib, ONNX Runtime over external data with prepacking off): the page
cache holds it once -- and so does modelshare with ``map_files=True`` (``modelshare-mapped``),
whose segment leaves those weights in the file. Ray's zero-copy pattern (the state dict in its
object store, read-only views in every process) is the peer for PyTorch where Ray is installed.
The default limit fits one copy of the model beside the bare worker
processes (plus ``headroom``) -- about 1.8x the model for a 1 GiB PyTorch model and 4 workers --
far below a private copy per process.
"""

from . import Scenario, headroom


def _limit(model: int, processes: int, threads: int, bare: int) -> int:
    return processes * bare + model + headroom(model)


SCENARIO = Scenario(
    number=3,
    title="one large model shared by all processes",
    approaches=("beam-shared", "beam-multi-process-shared", "mmap-file", "ray-object-store", "modelshare",
                "modelshare-mapped"),
    threads=1,
    default_limit=_limit,
    must_survive=("modelshare",),
)
