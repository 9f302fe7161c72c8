"""Every exception and warning modelshare raises: each one names what went wrong and what to do.

All errors derive from :class:`ModelShareError`, so ``except modelshare.ModelShareError`` catches
every failure that is modelshare's to report. Where a built-in exception type fits too (a bad key
is a ``ValueError``, a full directory an ``OSError``, a budget a ``MemoryError``), the class derives
from both, so code written against the built-in keeps working. The tree::

    ModelShareError
    ├── InvalidKeyError (ValueError)          a key that cannot name a segment file
    ├── LoaderError (RuntimeError)            the user's loader raised; nothing was published (and
    │                                         is an instance of what it raised too: ``caused_by``)
    ├── EncodeError (TypeError)               a codec cannot split the model into skeleton + buffers
    ├── SegmentCorruptedError                 a segment file that is not a complete, valid segment
    ├── SegmentDirectoryError (OSError)       the segment directory cannot be used (or trusted)
    ├── UntrustedFileError (PermissionError)  a file modelshare did not make where it expects its own
    ├── AcquireTimeoutError (TimeoutError)    waited longer than ``timeout`` for a model
    ├── ModelReleasedError (RuntimeError)     a model used after its release
    ├── MemoryBudgetExceeded (MemoryError)    a model does not fit its budget
    │   ├── GpuMemoryExceeded                 ... on a GPU
    │   └── AdmissionRefused                  ... now, found out before its segment was written
    ├── ServerDiedError                       a model server died during a call (or while starting)
    ├── CallTimeoutError (TimeoutError)       a call took longer than ``Server(call_timeout=)``
    ├── RemoteError                           a server-side exception that could not travel as is
    ├── OwnerStartError (RuntimeError)        a server or GPU-copy keeper exited before it served
    ├── DeviceUnavailableError (RuntimeError) a GPU this machine does not have
    ├── DeviceCopyMismatchError               a GPU copy made from other weights than the segment
    └── CudaError                             a CUDA driver call failed

    RemoteTraceback       the server-side traceback, set as ``__cause__`` of a model's exception
    CopiedOnLoadWarning   a model whose weights are copied when rebuilt: sharing saves nothing
    UntrustedFileWarning  ``ls`` / ``gc`` skipped a file that is not modelshare's
"""

from __future__ import annotations

__all__ = [
    "ModelShareError",
    "InvalidKeyError",
    "LoaderError",
    "EncodeError",
    "SegmentCorruptedError",
    "SegmentDirectoryError",
    "UntrustedFileError",
    "AcquireTimeoutError",
    "ModelReleasedError",
    "MemoryBudgetExceeded",
    "GpuMemoryExceeded",
    "AdmissionRefused",
    "ServerDiedError",
    "CallTimeoutError",
    "RemoteError",
    "OwnerStartError",
    "DeviceUnavailableError",
    "DeviceCopyMismatchError",
    "CudaError",
    "RemoteTraceback",
    "CopiedOnLoadWarning",
    "UntrustedFileWarning",
]


class ModelShareError(Exception):
    """Base class of every error modelshare raises on its own account."""


class InvalidKeyError(ModelShareError, ValueError):
    """A model key that cannot name a segment file (empty, too long, or with path characters)."""


class LoaderError(ModelShareError, RuntimeError):
    """The user's loader raised; nothing was published. The original exception is ``__cause__``.

    Made with :meth:`caused_by`, it is an instance of the cause's class too, so that code written
    against what the loader raises -- ``except FileNotFoundError``, a framework's own error, Beam's
    handlers' -- catches it as before, with modelshare's context in the message.
    """

    @classmethod
    def caused_by(cls, message: str, cause: BaseException) -> "LoaderError":
        """A LoaderError that is also an instance of ``type(cause)`` (where that class can be
        subclassed with a message alone), with ``cause`` as its ``__cause__``."""
        error = _loader_error_class(type(cause))(message)
        error.__cause__ = cause
        return error


class EncodeError(ModelShareError, TypeError):
    """A codec could not split the model into a skeleton and buffers (e.g. it is not picklable)."""


class SegmentCorruptedError(ModelShareError):
    """A segment file exists but is not a complete, valid segment (truncated or overwritten).

    ``reason`` says in a few words what is wrong with it (for ``modelshare ls``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class SegmentDirectoryError(ModelShareError, OSError):
    """The segment directory cannot be used: missing permission, no room left, not a directory."""


class UntrustedFileError(ModelShareError, PermissionError):
    """A file where modelshare expects one of its own is not: a symlink, a FIFO or other
    non-regular file, another user's file, or a socket served by another user. It is never read,
    unpickled, signalled or deleted."""


class AcquireTimeoutError(ModelShareError, TimeoutError):
    """Waiting for a model (another process's load, a server's start) took longer than ``timeout``."""


class ModelReleasedError(ModelShareError, RuntimeError):
    """A model (a server client) was used after ``release()``; ``acquire()`` it again."""


class MemoryBudgetExceeded(ModelShareError, MemoryError):
    """A model does not fit the budget, and nothing that could be evicted would make room."""


class GpuMemoryExceeded(MemoryBudgetExceeded):
    """A model's GPU copy does not fit the GPU's budget or its free memory (``Processes(device=...)``)."""


class AdmissionRefused(MemoryBudgetExceeded):
    """A routed model's exact size, known once it was loaded and encoded, does not fit the budget now:
    nothing was written. Its router waits for room (the size now known) and raises
    :class:`MemoryBudgetExceeded` if none comes within ``wait``."""


class ServerDiedError(ModelShareError):
    """The server running a call died before answering it."""


class CallTimeoutError(ModelShareError, TimeoutError):
    """A call to a model server took longer than ``Server(call_timeout=...)``; its connection was
    dropped (the copy stays busy until it answers, and calls go to the other copies meanwhile)."""


class RemoteError(ModelShareError):
    """A model server raised an exception that could not be sent back as is (it does not pickle)."""


class OwnerStartError(ModelShareError, RuntimeError):
    """A model server or GPU-copy keeper exited before it served; ``stderr`` is the tail of what it
    printed (its log), ``died`` whether it was killed rather than failed."""

    def __init__(self, message: str, stderr: str = "", died: bool = False) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.died = died  # killed while starting, rather than failed


class DeviceUnavailableError(ModelShareError, RuntimeError):
    """A model was asked for on a GPU that this machine does not have (no driver, no device)."""


class DeviceCopyMismatchError(ModelShareError):
    """A GPU copy was made from other weights than the segment this process maps."""


class CudaError(ModelShareError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised inside a model server (set as the ``__cause__``)."""

    def __str__(self) -> str:
        return "\n\n" + str(self.args[0])


class CopiedOnLoadWarning(UserWarning):
    """The model holds objects that copy their weights when rebuilt: sharing them saves nothing."""


class UntrustedFileWarning(UserWarning):
    """``ls`` / ``gc`` skipped a file that is not modelshare's (the message says which and why)."""


_loader_error_classes: dict[type, type] = {}


def _loader_error_class(cause: type) -> type:
    """``LoaderError`` and ``cause`` in one class (made once per cause class); ``LoaderError``
    alone where ``cause`` cannot take part (a final class, a layout or an ``__init__`` that a
    message alone does not satisfy)."""
    if issubclass(LoaderError, cause) or not issubclass(cause, Exception):
        return LoaderError
    made = _loader_error_classes.get(cause)
    if made is None:
        try:
            made = type("LoaderError", (LoaderError, cause), {
                "__module__": __name__,
                "__qualname__": f"LoaderError[{cause.__qualname__}]",
                "__init__": _message_init,
                "__str__": BaseException.__str__,
                "__reduce__": _reduce_loader_error,
            })
            made("a probe")
        except Exception:  # noqa: BLE001 - whatever the class refuses, the plain LoaderError serves
            made = LoaderError
        _loader_error_classes[cause] = made
    return made


def _message_init(self: BaseException, message: str) -> None:
    BaseException.__init__(self, message)


def _reduce_loader_error(self: LoaderError) -> tuple:
    cause = next(base for base in type(self).__bases__ if base is not LoaderError)
    return (_rebuild_loader_error, (cause, str(self)))


def _rebuild_loader_error(cause: type, message: str) -> LoaderError:
    """Unpickle a ``LoaderError.caused_by`` error (a worker's, sent to its parent)."""
    return _loader_error_class(cause)(message)
