"""modelshare: load a model once per machine and share it zero-copy across threads and processes.

Public API (everything else is private)::

    from modelshare import SharedModel

    shared = SharedModel(load_model, key="ranker", share="processes")
    with shared.use() as model:
        model.predict(batch)

See ``SharedModel`` for the lifetime rules, ``modelshare.codecs`` to teach it a new framework,
``modelshare.memory`` for USS/PSS accounting, ``modelshare.threads`` to share the cores out among the
processes computing on one model, and ``modelshare ls`` / ``modelshare gc`` to
inspect and clean the segment directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from . import _segment, memory
from ._budget import Budget, GpuMemoryExceeded, MemoryBudgetExceeded
from ._router import KeyStats, ModelRouter
from ._segment import SegmentInfo, default_directory
from ._shared import HoldInfo, SharedModel
from .codecs import Codec, Encoded, codec_for, get_codec, register_codec
from .codecs.generic import CopiedOnLoadWarning
from .errors import (
    AcquireTimeoutError,
    DeviceUnavailableError,
    EncodeError,
    InvalidKeyError,
    LoaderError,
    ModelShareError,
    SegmentCorruptedError,
    SegmentDirectoryError,
)

__version__ = "0.1.0"

__all__ = [
    "SharedModel",
    "HoldInfo",
    "ModelRouter",
    "Budget",
    "KeyStats",
    "MemoryBudgetExceeded",
    "GpuMemoryExceeded",
    "Codec",
    "Encoded",
    "register_codec",
    "codec_for",
    "get_codec",
    "SegmentInfo",
    "list_segments",
    "gc_segments",
    "default_directory",
    "memory",
    "ModelShareError",
    "InvalidKeyError",
    "LoaderError",
    "EncodeError",
    "SegmentCorruptedError",
    "SegmentDirectoryError",
    "AcquireTimeoutError",
    "DeviceUnavailableError",
    "CopiedOnLoadWarning",
]


def list_segments(directory: Union[str, os.PathLike[str], None] = None) -> list[SegmentInfo]:
    """Every segment in ``directory`` (default: the default directory) with its holders' pids."""
    return _segment.list_segments(Path(directory) if directory is not None else default_directory())


def gc_segments(
    directory: Union[str, os.PathLike[str], None] = None, *, include_warm: bool = False, dry_run: bool = False
) -> list[Path]:
    """Remove segments no live process holds (and half-written files); return what was removed.

    Segments published with ``keep_warm=True`` stay unless ``include_warm``.
    """
    return _segment.sweep(
        Path(directory) if directory is not None else default_directory(), include_warm=include_warm, dry_run=dry_run
    )
