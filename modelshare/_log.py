"""modelshare's loggers, which import ``logging`` only for a record someone could see.

Until a program imports ``logging`` no handler exists and no logger can be set below WARNING, so an
INFO record would be dropped: ``Log.info`` drops it without importing ``logging`` (0.6 MiB in every
process that never logs). Warnings always go through ``logging``, whose last resort prints them.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Log"]


class Log:
    """The ``logging.Logger`` named ``name``, looked up per record (``info`` and ``warning`` only)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self, message: str, *args: Any) -> None:
        logging = sys.modules.get("logging")
        if logging is not None:  # else nothing can have enabled INFO: the record would be dropped
            logging.getLogger(self.name).info(message, *args, stacklevel=2)

    def warning(self, message: str, *args: Any) -> None:
        import logging

        logging.getLogger(self.name).warning(message, *args, stacklevel=2)
