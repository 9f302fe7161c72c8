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
directory. ``import modelshare`` loads only the exceptions: every other name loads its code on first
use, so a process pays for what it runs (an attaching worker never loads the router, the server's
client or the GPU code).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from . import errors
from .errors import *  # noqa: F403 -- every exception is public (errors.__all__)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from . import memory
    from ._fingerprint import loader_fingerprint
    from ._gpu.copies import check_device
    from ._gpu.keeper import DeviceCopyInfo as GpuCopyInfo
    from ._gpu.keeper import list_device_copies as list_gpu_copies
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

__version__ = "0.1.0"

# Every public name but the exceptions is imported on first use: a process pays (in memory and
# start-up) for the code it runs -- a worker that attaches one model never loads the router, the
# server's client or the GPU code. Name -> (module, attribute; None: the module itself).
_LAZY: dict[str, tuple[str, Optional[str]]] = {
    "SharedModel": ("._shared", "SharedModel"),
    "Threads": ("._modes.threads", "Threads"),
    "Processes": ("._modes.processes", "Processes"),
    "Server": ("._modes.server", "Server"),
    "HoldInfo": ("._modes", "HoldInfo"),
    "InstancePool": ("._modes.pool", "InstancePool"),
    "ModelRouter": ("._router.router", "ModelRouter"),
    "KeyStats": ("._router.router", "KeyStats"),
    "Budget": (".budget", "Budget"),
    "Codec": (".codecs", "Codec"),
    "Encoded": (".codecs", "Encoded"),
    "register_codec": (".codecs", "register_codec"),
    "codec_for": (".codecs", "codec_for"),
    "get_codec": (".codecs", "get_codec"),
    "SegmentInfo": ("._host.inventory", "SegmentInfo"),
    "default_directory": ("._host.directory", "default_directory"),
    "make_key": ("._host.directory", "make_key"),
    "loader_fingerprint": ("._fingerprint", "loader_fingerprint"),
    "check_device": ("._gpu.copies", "check_device"),
    "list_gpu_copies": ("._gpu.keeper", "list_device_copies"),
    "GpuCopyInfo": ("._gpu.keeper", "DeviceCopyInfo"),
    "memory": (".memory", None),
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
    "check_device",
    "list_gpu_copies",
    "GpuCopyInfo",
    "memory",
    "errors",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (see ``_LAZY``)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'modelshare' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names too, before their first use (completion and ``dir()`` see them all)."""
    return sorted({*globals(), *__all__})


def list_segments(directory: Union[str, os.PathLike[str], None] = None) -> list[SegmentInfo]:
    """Every segment in ``directory`` (default: the default directory) with its holders' pids."""
    from ._host import inventory
    from ._host.directory import default_directory

    return inventory.list_segments(Path(directory) if directory is not None else default_directory())


def gc_segments(
    directory: Union[str, os.PathLike[str], None] = None, *, include_warm: bool = False, dry_run: bool = False
) -> list[Path]:
    """Remove segments no live process holds (and half-written files); return what was removed.

    Segments published with ``keep_warm=True`` stay unless ``include_warm``.
    """
    from ._host import inventory
    from ._host.directory import default_directory

    return inventory.sweep(
        Path(directory) if directory is not None else default_directory(), include_warm=include_warm, dry_run=dry_run
    )
