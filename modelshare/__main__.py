"""``python -m modelshare``: the same as the ``modelshare`` console script."""

from .cli import main

raise SystemExit(main())
