"""``python -m benchmarks.gpu``: the GPU benchmark (``benchmark``)."""

from .benchmark import main

raise SystemExit(main())
