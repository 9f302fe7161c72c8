"""modelshare's benchmarks: the OOM suite (``suite/``, ``python -m benchmarks --help``), studies of
one question each (``studies/``), and the GPU checks (``gpu/``). Models are generated here
(``models``), loaded by framework (``frameworks``) and run under memory cgroups (``cgroup``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: worker processes run from here
