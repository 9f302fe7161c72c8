"""A loader's fingerprint: changes when the loader's code or arguments change, so nobody attaches
to a segment that an older loader published.

A segment is named by its key plus a version. When the user gives ``version=`` (say the mtime or
hash of the weights file) that decides. Otherwise the version is this fingerprint, computed once
where the :class:`SharedModel` is built and carried with it when it is pickled, so every process
agrees on it. It covers:

* a function's bytecode, constants (nested functions included), defaults, closure values, and
  the values of simple module constants it reads (``WEIGHTS = "v2.npz"``);
* ``functools.partial`` arguments; a bound method's instance; a callable object's state.

It does not see into files a loader reads or functions it calls by name: pass ``version=`` for
those. Values that cannot be pickled are fingerprinted by type only, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import types
import warnings
from typing import Any, Callable

import cloudpickle

_SIMPLE = (str, bytes, int, float, complex, bool, type(None))


def loader_fingerprint(loader: Callable[[], Any]) -> str:
    """A hex digest that identifies ``loader``'s code and bound values."""
    digest = hashlib.blake2b(digest_size=16)
    _feed_callable(digest, loader, set())
    return digest.hexdigest()


def _feed(digest: "hashlib._Hash", *parts: Any) -> None:
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _feed_value(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, _SIMPLE):
        _feed(digest, type(value).__name__, value)
        return
    try:
        _feed(digest, cloudpickle.dumps(value, protocol=5))
    except Exception as exc:  # unpicklable: fall back to the type, and say so
        warnings.warn(
            f"cannot fingerprint a {type(value).__qualname__} bound to the loader ({exc}); a "
            "change to it will not be noticed -- pass version= to SharedModel to be explicit",
            stacklevel=4,
        )
        _feed(digest, "unpicklable", type(value).__module__, type(value).__qualname__)


def _feed_code(digest: "hashlib._Hash", code: types.CodeType) -> None:
    _feed(digest, code.co_code, code.co_names, code.co_varnames, code.co_argcount)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(digest, const)
        elif isinstance(const, frozenset):  # repr order follows string hashing: sort it
            _feed(digest, "frozenset", sorted(repr(item) for item in const))
        else:
            _feed(digest, type(const).__name__, const)


def _feed_function(digest: "hashlib._Hash", func: types.FunctionType, seen: set[int]) -> None:
    _feed(digest, func.__module__, func.__qualname__)
    _feed_code(digest, func.__code__)
    for value in (func.__defaults__ or ()) + tuple((func.__kwdefaults__ or {}).items()):
        _feed_value(digest, value)
    for cell in func.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(contents) and not isinstance(contents, type):
            _feed_callable(digest, contents, seen)
        else:
            _feed_value(digest, contents)
    for global_name in func.__code__.co_names:
        value = func.__globals__.get(global_name)
        if isinstance(value, _SIMPLE) or (
            isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)
        ):
            _feed(digest, global_name, value)


def _feed_callable(digest: "hashlib._Hash", loader: Any, seen: set[int]) -> None:
    if id(loader) in seen:
        return
    seen.add(id(loader))
    if isinstance(loader, functools.partial):
        _feed(digest, "partial")
        _feed_callable(digest, loader.func, seen)
        for value in loader.args + tuple(sorted(loader.keywords.items())):
            _feed_value(digest, value)
    elif isinstance(loader, types.FunctionType):
        _feed_function(digest, loader, seen)
    elif isinstance(loader, types.MethodType):
        _feed_callable(digest, loader.__func__, seen)
        _feed_value(digest, loader.__self__)
    elif isinstance(loader, type):
        _feed(digest, "class", loader.__module__, loader.__qualname__)
        init = loader.__dict__.get("__init__")
        if isinstance(init, types.FunctionType):
            _feed_function(digest, init, seen)
    else:
        _feed(digest, "object", type(loader).__module__, type(loader).__qualname__)
        call = getattr(type(loader), "__call__", None)
        if isinstance(call, types.FunctionType):
            _feed_function(digest, call, seen)
        _feed_value(digest, loader)
