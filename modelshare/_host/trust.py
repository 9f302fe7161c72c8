"""What modelshare trusts, and how it checks.

The threat model: processes of this uid trust each other; other local users do not, and neither
does any file, directory or socket modelshare did not create. Modelshare never deletes, signals,
unpickles or connects to what it cannot prove is its own:

* **The directory** (default, ``$MODELSHARE_DIR`` or ``directory=``), checked on first use by
  :func:`ensure_directory`: a real directory (not a symlink), owned by this uid, not writable by
  group or others; and every directory above it owned by root or this uid and either not writable
  by others or sticky (as ``/dev/shm`` and ``/tmp`` are) -- so nobody else can put files in it or
  swap it for another. Anchors: PostgreSQL refuses a data directory with group or other access;
  OpenSSH's StrictModes checks the path up to ``/``.
* **Its files** are opened without following symlinks and without blocking (:func:`open_own`),
  then checked: a regular file owned by this uid, else :class:`UntrustedFileError` (``acquire()``
  refuses; ``ls`` and ``gc`` skip it with a warning). A FIFO cannot hang anything.
* **What is deleted**: only files whose names modelshare makes (``directory``), that are this
  uid's regular files, in a *dedicated* directory -- one holding nothing else. A directory that
  also holds a project's files (``poetry.lock``, ``labels.seg``) is never swept; the last holder
  of a segment still unlinks the segment it holds.
* **Sockets**: both ends check the peer's uid (``SO_PEERCRED``) before reading a byte, and a
  client connects only to a socket file owned by this uid.
* **Signals**: ``gc`` stops a server only after proving it is this uid's server process (see
  ``_owners.server``).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

from ..errors import SegmentDirectoryError, UntrustedFileError, UntrustedFileWarning
from .directory import is_modelshare_name

__all__ = ["ensure_directory", "open_own", "read_own", "check_own", "foreign_names", "warn_skipped"]

_NO_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def ensure_directory(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) if needed; check that this uid alone can write in it and
    in nothing above it that others could swap (see the module docstring). Returns it, absolute."""
    directory = Path(os.path.abspath(directory))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symlink or a file: said below
    except OSError as exc:
        raise SegmentDirectoryError(
            exc.errno,
            f"cannot create the segment directory {directory} ({exc.strerror}); pass "
            "directory=... or set MODELSHARE_DIR to a directory of your own on tmpfs (e.g. /dev/shm/<name>)",
        ) from exc
    st = os.lstat(directory)
    fix = "set MODELSHARE_DIR (or directory=) to a directory of your own, e.g. /dev/shm/modelshare-<name>"
    if stat.S_ISLNK(st.st_mode):
        raise SegmentDirectoryError(errno.ELOOP, f"the segment directory {directory} is a symlink (to "
                                    f"{os.readlink(directory)}); modelshare does not follow it: remove it, or {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise SegmentDirectoryError(errno.ENOTDIR, f"{directory} is not a directory; {fix}")
    if st.st_uid != os.getuid():
        raise SegmentDirectoryError(errno.EPERM, f"the segment directory {directory} belongs to uid {st.st_uid}, "
                                    f"not to this user ({os.getuid()}); {fix}")
    if st.st_mode & 0o022:
        raise SegmentDirectoryError(
            errno.EPERM, f"the segment directory {directory} is writable by {_who(st.st_mode)} (mode "
            f"{stat.S_IMODE(st.st_mode):o}): anyone who can write there could plant models; run "
            f"`chmod go-w {directory}`, or {fix}")
    _check_ancestors(directory, fix)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SegmentDirectoryError(errno.EACCES, f"no permission to write in the segment directory {directory}; "
                                    f"fix its permissions, or {fix}")
    return directory


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)


def _check_ancestors(directory: Path, fix: str) -> None:
    """Every directory above ``directory``: owned by root or this uid, and not writable by others
    unless sticky (then others cannot rename or remove what is not theirs)."""
    parent = Path(os.path.realpath(directory.parent))
    for ancestor in (parent, *parent.parents):
        st = os.stat(ancestor)
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if st.st_uid not in (0, os.getuid()) or (st.st_mode & 0o022 and not sticky):
            raise SegmentDirectoryError(
                errno.EPERM, f"the segment directory {directory} lies under {ancestor} (uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}), which another user could rename or replace; {fix}")


def check_own(st: os.stat_result, path: Path, what: str = "a regular file") -> None:
    """Raise :class:`UntrustedFileError` unless ``st`` (of ``path``) is ``what`` and this uid's."""
    kind = stat.S_IFMT(st.st_mode)
    wanted = stat.S_IFSOCK if what == "a socket" else stat.S_IFREG
    if kind != wanted:
        names = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink",
                 stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
        raise UntrustedFileError(f"{path} is {names.get(kind, 'not a regular file')}, not {what} modelshare made: "
                                 "it is not read, used or deleted; remove it if it is not yours")
    if st.st_uid != os.getuid():
        raise UntrustedFileError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): modelshare "
                                 "does not read, use or delete another user's files; remove it, or use a directory "
                                 "of your own")


def open_own(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` without following a symlink and without blocking on a FIFO, checked to be this
    uid's regular file (:class:`UntrustedFileError` otherwise); FileNotFoundError passes through."""
    try:
        fd = os.open(path, flags | _NO_FOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFileError(f"{path} is a symlink, not a file modelshare made: it is not followed, read or "
                                     "deleted; remove it if it is not yours") from None
        raise
    try:
        check_own(os.fstat(fd), path)
        if flags & os.O_NONBLOCK == 0:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own(path: Path, limit: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of this uid's regular file ``path`` (:func:`open_own`'s checks)."""
    fd = open_own(path, os.O_RDONLY)
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def foreign_names(directory: Path) -> list[str]:
    """Entries of ``directory`` whose names modelshare does not make: a directory with any is not
    dedicated to modelshare, and is never swept."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name for name in names if not is_modelshare_name(name))


def warn_skipped(why: UntrustedFileError) -> None:
    """Say that ``ls`` / ``gc`` left a file alone, and why (``why`` names it)."""
    warnings.warn(UntrustedFileWarning(f"skipped: {why}"), stacklevel=3)
