"""Budget: how many bytes of models a machine may hold, for host RAM and for each GPU.

Sizes are ints (bytes) or strings with a binary or decimal unit: ``"512MiB"``, ``"4 GiB"``,
``"20GB"``, ``"1.5GiB"``. A budget is per machine, not per process: every process that routes
through the same directory shares it (see ``ModelRouter``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

Size = Union[int, str]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(size: Size) -> int:
    """Bytes in ``size`` (an int, or a string such as ``"512MiB"``); a clear ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"a size is an int of bytes or a string like '4GiB', not {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"a size cannot be negative: {size}")
        return size
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the size {size!r}: write bytes as an int, or a number with a unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '4GiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """``n`` bytes for people: ``"1.5 GiB"``, ``"12.0 MiB"``, ``"512 B"``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Budget:
    """Bytes of models the machine may hold: ``host`` (RAM, shared-memory segments) and per GPU.

    ``Budget(host="4GiB", gpu={0: "20GiB"})``. None means no limit of our own (the machine's
    available memory still applies).
    """

    host: Optional[int] = None
    gpu: Mapping[int, int] = field(default_factory=dict)

    def __init__(self, host: Optional[Size] = None, gpu: Optional[Mapping[int, Size]] = None) -> None:
        object.__setattr__(self, "host", None if host is None else parse_size(host))
        object.__setattr__(self, "gpu", {int(k): parse_size(v) for k, v in (gpu or {}).items()})

