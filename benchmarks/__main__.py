"""``python -m benchmarks``: the OOM suite (``benchmarks.suite``); ``--help`` for its options."""

from .suite.cli import main

raise SystemExit(main())
