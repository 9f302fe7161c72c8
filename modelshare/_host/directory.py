"""The segment directory and the names of the files in it: the one place that makes and reads them.

Every file modelshare keeps for a model version is named after it -- ``<key>--<version hash>``,
the *stem* -- plus a suffix::

    <stem>.seg                           the segment (see ``format``)
    <stem>.lock                          its lock file: holders share it, publishers exclude
    <stem>.seg.tmp-<...>                 a segment being written, or a file a codec writes beside it
    <stem>.<owner>.{sock,srv,gpu,start,log}  an owner process's socket, status, start lock and output, where
                                         ``<owner>`` is ``copy<N>`` (a model server) or
                                         ``gpu-<uuid>`` (the keeper of a GPU copy)
    <stem>.<owner>.sock.<pid>            an owner's socket, bound but not yet in place

Keys never contain ``--`` and versions are lowercase hex, so a name splits one way only:
:func:`parse` reads it back, and a name it cannot read is not modelshare's and is never touched.
Beside these, routers keep ``router.ledger``, ``router.lock`` and ``router.users``
(``_router``), and ``modelshare.counts`` counts loads, attaches and evictions (``counts``).
Nothing else in a directory is modelshare's (see ``trust``).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..errors import InvalidKeyError, SegmentDirectoryError

__all__ = ["default_directory", "directory_error", "is_modelshare_name", "ROUTER_FILES", "COUNTS_FILE", "validate_key",
           "make_key", "SegmentName", "DirEntry", "parse", "split_name", "scan"]

_KEY = r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,127}"
_KEY_RE = re.compile(_KEY)
SEGMENT, LOCK, TEMPORARY = ".seg", ".lock", ".seg.tmp-"
_NAME_RE = re.compile(
    rf"(?P<stem>(?P<key>{_KEY})--(?P<version>[0-9a-f]+))"
    r"(?:(?P<segment>\.seg)|(?P<lock>\.lock)|(?P<temporary>\.seg\.tmp-[A-Za-z0-9-]+)"
    r"|\.(?P<owner>copy[0-9]+|gpu-[0-9a-f]+)(?P<kind>\.sock|\.srv|\.gpu|\.start|\.log)(?P<binding>\.[0-9]+)?)"
)

Kind = Literal["segment", "lock", "temporary", "owner"]
ROUTER_FILES = ("router.ledger", "router.ledger.tmp", "router.lock", "router.users")
COUNTS_FILE = "modelshare.counts"


def default_directory() -> Path:
    """``$MODELSHARE_DIR`` if set, else ``/dev/shm/modelshare-<uid>`` (tmpfs: memory, not disk)."""
    env = os.environ.get("MODELSHARE_DIR")
    if env:
        return Path(env)
    return Path("/dev/shm") / f"modelshare-{os.getuid()}"


def directory_error(exc: OSError, directory: Path, needed: int = 0) -> SegmentDirectoryError:
    """``exc``, raised writing in ``directory``, as an error that says what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
        except OSError:
            free = -1
        return SegmentDirectoryError(
            exc.errno,
            f"no room for a {needed / 2**20:.1f} MiB segment in {directory} "
            f"({free / 2**20:.1f} MiB free); free memory there (modelshare gc), enlarge the tmpfs, "
            "or set MODELSHARE_DIR to a directory with room",
        )
    return SegmentDirectoryError(
        exc.errno,
        f"cannot write a segment in {directory} ({exc.strerror}); fix the directory's "
        "permissions or set MODELSHARE_DIR to a directory this user can write",
    )


def validate_key(key: str) -> str:
    """Return ``key`` if it can name a segment file, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or "--" in key:
        raise InvalidKeyError(
            f"model key {key!r} cannot name a segment: use 1-128 characters from letters, digits "
            "and '_.=+-', starting with a letter, digit or '_', without '--' (no '/', no spaces)"
        )
    return key


def make_key(text: str, fallback: str = "model") -> str:
    """``text`` made into a valid model key (other characters become ``_``), or ``fallback``."""
    key = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)[:100]).lstrip(".-=+")
    return key if key and _KEY_RE.fullmatch(key) else validate_key(fallback)


@dataclass(frozen=True)
class SegmentName:
    """One model version in a directory, and the paths of every file modelshare keeps for it."""

    directory: Path
    stem: str

    @classmethod
    def for_model(cls, directory: Path, key: str, version_hash: str) -> "SegmentName":
        return cls(Path(directory), f"{validate_key(key)}--{version_hash}")

    @property
    def key(self) -> str:
        return self.stem.rpartition("--")[0]

    @property
    def version(self) -> str:
        return self.stem.rpartition("--")[2]

    @property
    def seg_path(self) -> Path:
        return self.directory / (self.stem + SEGMENT)

    @property
    def lock_path(self) -> Path:
        return self.directory / (self.stem + LOCK)

    def temporary_path(self) -> Path:
        """A fresh name for a segment while it is written (renamed to ``seg_path`` when complete):
        ``<stem>.seg.tmp-<pid>-<hex>``. Whoever next holds the segment's exclusive lock (a publisher,
        ``gc``) removes it if its writer died."""
        return self.directory / f"{self.stem}{TEMPORARY}{os.getpid()}-{os.urandom(4).hex()}"

    def owner_path(self, owner: str, kind: str) -> Path:
        """The socket (``.sock``), status (``.srv``, ``.gpu``) or start lock (``.start``) of one owner."""
        return self.directory / f"{self.stem}.{owner}{kind}"

    def temporaries(self) -> list[Path]:
        """This version's temporary files: segments being written."""
        prefix = self.stem + TEMPORARY
        try:
            filenames = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [self.directory / f for f in filenames
                if f.startswith(prefix) and split_name(f) == (self.stem, "temporary")]


@dataclass(frozen=True)
class DirEntry:
    """A file of modelshare's in a segment directory, as :func:`parse` read its name."""

    name: SegmentName
    filename: str
    kind: Kind
    owner: str = ""  # for kind "owner": copy<N> or gpu-<uuid>
    owner_kind: str = ""  # for kind "owner": .sock, .srv, .gpu, .start or .log
    binding: bool = False  # an owner's socket bound under a temporary name

    @property
    def path(self) -> Path:
        return self.name.directory / self.filename


def split_name(filename: str) -> Optional[tuple[str, Kind]]:
    """(stem, kind) of a name modelshare makes, else None: :func:`parse` without the rest (for
    listings of thousands of files)."""
    match = _NAME_RE.fullmatch(filename)
    if match is None or "--" in match["key"]:
        return None
    kind: Kind = ("segment" if match["segment"] else "lock" if match["lock"] else
                  "temporary" if match["temporary"] else "owner")
    return match["stem"], kind


def parse(directory: Path, filename: str) -> Optional[DirEntry]:
    """What ``filename`` in ``directory`` is, or None if it is not a name modelshare makes."""
    match = _NAME_RE.fullmatch(filename)
    if match is None or "--" in match["key"]:
        return None
    name = SegmentName(directory, match["stem"])
    if match["segment"]:
        return DirEntry(name, filename, "segment")
    if match["lock"]:
        return DirEntry(name, filename, "lock")
    if match["temporary"]:
        return DirEntry(name, filename, "temporary")
    return DirEntry(name, filename, "owner", match["owner"], match["kind"], bool(match["binding"]))


def is_modelshare_name(filename: str) -> bool:
    """Whether ``filename`` is a name modelshare makes (a model version's file, or a router's)."""
    return filename in ROUTER_FILES or filename == COUNTS_FILE or split_name(filename) is not None


def scan(directory: Path) -> list[DirEntry]:
    """Every file of modelshare's in ``directory`` (one listing), in name order; [] if there is none."""
    try:
        filenames = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry for filename in filenames if (entry := parse(directory, filename)) is not None]
