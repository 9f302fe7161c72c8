"""modelshare: load a model once per machine and share it zero-copy across threads and processes.

Public API (everything else is private)::

    from modelshare import SharedModel

    shared = SharedModel(load_model, key="ranker")          # share="processes": one copy per machine
    with shared.use() as model:
        model.predict(batch)

See ``SharedModel`` for the lifetime rules; ``Threads``, ``Processes`` and ``Server`` for the ways to
share (``share=``) and their options; ``ModelRouter`` and ``Budget`` for many models under a byte
budget; ``modelshare.codecs`` to teach it a new framework; ``modelshare.memory`` for USS/PSS
accounting; ``modelshare.threads`` to share the cores out among the processes computing on one
model; ``modelshare.loaders`` for loaders that keep no private copy of the weights; ``modelshare.errors``
for every exception; and ``modelshare ls`` / ``modelshare gc`` to inspect and clean the segment
directory. GPU names (``check_device``, ``list_gpu_copies``, ``GpuCopyInfo``) load the GPU code on
first use: ``import modelshare`` loads none of it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Union

from . import errors, memory
from ._fingerprint import loader_fingerprint
from ._host import inventory
from ._host.directory import default_directory, make_key
from ._host.inventory import SegmentInfo
from ._modes import HoldInfo
from ._modes.pool import InstancePool
from ._modes.processes import Processes
from ._modes.server import Server
from ._modes.threads import Threads
from ._router.router import KeyStats, ModelRouter
from ._shared import SharedModel
from .budget import Budget
from .codecs import Codec, Encoded, codec_for, get_codec, register_codec
from .errors import *  # noqa: F403 -- every exception is public (errors.__all__)

__version__ = "0.1.0"

_GPU_NAMES = {
    "check_device": ("._gpu.copies", "check_device"),
    "list_gpu_copies": ("._gpu.keeper", "list_device_copies"),
    "GpuCopyInfo": ("._gpu.keeper", "DeviceCopyInfo"),
}

__all__ = [
    "SharedModel",
    "Threads",
    "Processes",
    "Server",
    "HoldInfo",
    "InstancePool",
    "ModelRouter",
    "Budget",
    "KeyStats",
    "Codec",
    "Encoded",
    "register_codec",
    "codec_for",
    "get_codec",
    "SegmentInfo",
    "list_segments",
    "gc_segments",
    "default_directory",
    "make_key",
    "loader_fingerprint",
    *_GPU_NAMES,
    "memory",
    "errors",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    """The GPU names, imported on first use (``import modelshare`` loads no GPU code)."""
    if name not in _GPU_NAMES:
        raise AttributeError(f"module 'modelshare' has no attribute {name!r}")
    module, attribute = _GPU_NAMES[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def list_segments(directory: Union[str, os.PathLike[str], None] = None) -> list[SegmentInfo]:
    """Every segment in ``directory`` (default: the default directory) with its holders' pids."""
    return inventory.list_segments(Path(directory) if directory is not None else default_directory())


def gc_segments(
    directory: Union[str, os.PathLike[str], None] = None, *, include_warm: bool = False, dry_run: bool = False
) -> list[Path]:
    """Remove segments no live process holds (and half-written files); return what was removed.

    Segments published with ``keep_warm=True`` stay unless ``include_warm``.
    """
    return inventory.sweep(
        Path(directory) if directory is not None else default_directory(), include_warm=include_warm, dry_run=dry_run
    )
