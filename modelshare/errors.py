"""The exceptions modelshare raises: each one names what went wrong and what to do about it.

All derive from :class:`ModelShareError`, so ``except modelshare.ModelShareError`` catches every
failure that is modelshare's to report. Where a built-in exception type fits too (a bad key is a
``ValueError``, a full directory an ``OSError``), the class derives from both, so code written
against the built-in keeps working.
"""

from __future__ import annotations


class ModelShareError(Exception):
    """Base class of every error modelshare raises on its own account."""


class InvalidKeyError(ModelShareError, ValueError):
    """A model key that cannot name a segment file (empty, too long, or with path characters)."""


class LoaderError(ModelShareError):
    """The user's loader raised; nothing was published. The original exception is ``__cause__``."""


class EncodeError(ModelShareError, TypeError):
    """A codec could not split the model into a skeleton and buffers (e.g. it is not picklable)."""


class SegmentCorruptedError(ModelShareError):
    """A segment file exists but is not a complete, valid segment (truncated or overwritten)."""


class SegmentDirectoryError(ModelShareError, OSError):
    """The segment directory cannot be used: missing permission, no room left, not a directory."""


class AcquireTimeoutError(ModelShareError, TimeoutError):
    """Waiting for another process to finish loading a model took longer than ``timeout``."""


class DeviceUnavailableError(ModelShareError, RuntimeError):
    """A model was asked for on a GPU that this machine does not have (no driver, no device)."""
