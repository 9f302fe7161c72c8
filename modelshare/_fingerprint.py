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
those. Values that cannot be pickled are fingerprinted by type only, with a warning; a loader
whose bound values are too deep to walk is fingerprinted by its pickle (the same for every
process that gets the ``SharedModel`` pickled, not necessarily for one that builds its own).

The fingerprint is the same in every process for the same loader -- independently started
interpreters, spawn-start children -- so they share one segment: values are fed in a canonical
form (sets and dict keys sorted, objects by their type and attributes, never by hash order,
object ids or cloudpickle's class-tracker ids), and a script's ``__main__`` is the same module as
its spawn children's ``__mp_main__``.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
from pathlib import PurePath
from typing import Any, Callable, Optional

# BLAKE2b, the one hash modelshare uses, without ``import hashlib``: that loads OpenSSL's libcrypto
# (0.6 MiB private, ~3 MiB mapped, in every process) for a hash CPython builds in.
try:
    from _blake2 import blake2b
except ImportError:  # a Python built without its own BLAKE2: hashlib's serves
    from hashlib import blake2b

_SIMPLE = (str, bytes, int, float, complex, bool, type(None))


def loader_fingerprint(loader: Callable[[], Any]) -> str:
    """A hex digest that identifies ``loader``'s code and bound values."""
    digest = blake2b(digest_size=16)
    _walk.memo = {}
    try:
        _feed_callable(digest, loader, set())
    except RecursionError:  # bound values too deep to walk (a mock, a long linked graph): pickle them whole
        digest = blake2b(digest_size=16)
        _feed(digest, "deep")
        _feed_pickled(digest, loader)
    finally:
        _walk.memo = {}
    return digest.hexdigest()


# Each value's digest, once per fingerprint: an object reached by many paths (a framework's
# module-level state, a shared config) is walked once, not once per path -- which grows
# exponentially with the graph's depth. Values are kept with their digests so that no id is
# reused by a temporary while the walk lasts.
_walk = threading.local()


def _feed(digest: "blake2b", *parts: Any) -> None:
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _module(name: str) -> str:
    """A module's name as every process knows it (spawn children run the script as ``__mp_main__``)."""
    return "__main__" if name == "__mp_main__" else name


def _feed_value(digest: "blake2b", value: Any, seen: Optional[set[int]] = None) -> None:
    """``value`` in a canonical form: equal values feed equal bytes in every process."""
    seen = set() if seen is None else seen
    if isinstance(value, _SIMPLE):
        _feed(digest, type(value).__name__, value)
        return
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        _feed_callable(digest, value, seen)
        return
    if id(value) in seen:
        _feed(digest, "cycle")
        return
    seen.add(id(value))
    kind = type(value)
    if kind in (list, tuple):
        _feed(digest, kind.__name__, len(value))
        for item in value:
            _feed(digest, _value_digest(item, seen))
    elif kind in (set, frozenset):
        _feed(digest, kind.__name__, sorted(_value_digest(item, seen) for item in value))
    elif kind is dict:
        items = sorted((_value_digest(k, seen), _value_digest(v, seen)) for k, v in value.items())
        _feed(digest, "dict", items)
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes") and hasattr(value, "dtype"):
        _feed(digest, "ndarray", str(value.dtype), getattr(value, "shape", ()),
              blake2b(value.tobytes(), digest_size=16).digest())
    elif isinstance(value, type):
        _feed(digest, "class", _module(value.__module__), value.__qualname__)
    elif isinstance(value, PurePath):  # the commonest bound value, without loading cloudpickle
        _feed(digest, kind.__name__, str(value))
    elif _plain_state(value):
        _feed(digest, "object", _module(kind.__module__), kind.__qualname__)
        _feed_value(digest, dict(vars(value)), seen)
    else:
        _feed_pickled(digest, value)


def _plain_state(value: Any) -> bool:
    """Whether ``value``'s state is its ``__dict__`` (the default ``__getstate__``)."""
    getstate = getattr(type(value), "__getstate__", None)
    return hasattr(value, "__dict__") and getstate is getattr(object, "__getstate__", None)


def _value_digest(value: Any, seen: set[int]) -> bytes:
    memo: dict[int, tuple[Any, bytes]] = getattr(_walk, "memo", None) or {}
    known = memo.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    digest = blake2b(digest_size=16)
    _feed_value(digest, value, set(seen))
    if hasattr(_walk, "memo"):
        _walk.memo[id(value)] = (value, digest.digest())
    return digest.digest()


def _feed_pickled(digest: "blake2b", value: Any) -> None:
    import cloudpickle  # here: not a cost of importing modelshare

    try:
        _feed(digest, cloudpickle.dumps(value, protocol=5))
    except Exception as exc:  # unpicklable: fall back to the type, and say so
        warnings.warn(
            f"cannot fingerprint a {type(value).__qualname__} bound to the loader ({exc}); a "
            "change to it will not be noticed -- pass version= to SharedModel to be explicit",
            stacklevel=4,
        )
        _feed(digest, "unpicklable", _module(type(value).__module__), type(value).__qualname__)


def _feed_code(digest: "blake2b", code: types.CodeType) -> None:
    _feed(digest, code.co_code, code.co_names, code.co_varnames, code.co_argcount)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(digest, const)
        elif isinstance(const, frozenset):  # repr order follows string hashing: sort it
            _feed(digest, "frozenset", sorted(repr(item) for item in const))
        else:
            _feed(digest, type(const).__name__, const)


def _feed_function(digest: "blake2b", func: types.FunctionType, seen: set[int]) -> None:
    _feed(digest, _module(func.__module__), func.__qualname__)
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


def _feed_callable(digest: "blake2b", loader: Any, seen: set[int]) -> None:
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
        _feed(digest, "class", _module(loader.__module__), loader.__qualname__)
        init = loader.__dict__.get("__init__")
        if isinstance(init, types.FunctionType):
            _feed_function(digest, init, seen)
    else:
        _feed(digest, "object", _module(type(loader).__module__), type(loader).__qualname__)
        call = getattr(type(loader), "__call__", None)
        if isinstance(call, types.FunctionType):
            _feed_function(digest, call, seen)
        _feed_value(digest, loader)
