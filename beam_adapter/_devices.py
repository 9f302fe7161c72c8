"""Where a wrapped handler's model goes: host memory, or one copy on a GPU for every worker.

Beam's PyTorch handlers say where they compute (``device="GPU"``) and send their batches there;
a model shared from such a handler is placed on that GPU by modelshare (``SharedModel(device=)``),
one copy for every worker process. Like Beam's own handler, a handler built for the GPU runs on the
CPU where no GPU is usable (checked in the worker, at load time: the launcher may have none).
Other handlers go to a GPU only when asked (``SharedModelHandler(..., device="cuda:N")``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import modelshare
from modelshare import DeviceUnavailableError

__all__ = ["handler_device", "usable_device"]


def _is_pytorch_handler(handler: Any) -> bool:
    return type(handler).__module__ == "apache_beam.ml.inference.pytorch_inference"


def handler_device(handler: Any, device: Optional[str]) -> Optional[str]:
    """The GPU to put ``handler``'s model on: ``device``, else a PyTorch handler's own GPU; a
    ``device`` that contradicts a PyTorch handler's CPU is refused (its batches would stay there)."""
    own = getattr(handler, "_device", None)
    if not _is_pytorch_handler(handler) or own is None:
        return device
    on_gpu = getattr(own, "type", str(own)) == "cuda"
    if device is None:
        return f"cuda:{own.index or 0}" if on_gpu else None
    if not on_gpu:
        raise ValueError(f"device={device!r}, but the wrapped {type(handler).__name__} runs on {own} and "
                         "sends its batches there; build it with device='GPU'")
    return device


def usable_device(handler: Any, device: Optional[str], asked: bool, key: str) -> Optional[str]:
    """``device`` where this machine has it; else, for a device the handler itself chose (not
    ``asked`` for), None -- the CPU, as Beam's handler falls back -- with the handler moved there too."""
    if device is None or asked:
        return device
    try:
        modelshare.check_device(device, key=key)
    except DeviceUnavailableError:
        logging.warning("%s asked for a GPU, but none is usable here: the model stays on the CPU",
                        type(handler).__name__)
        import torch

        handler._device = torch.device("cpu")
        return None
    return device
