"""Where a wrapped handler's model goes: host memory, or one copy on a GPU for every worker.

Beam's PyTorch handlers say where they compute (``device="GPU"``) and send their batches there;
a model shared from such a handler is placed on that GPU by modelshare (``SharedModel(device=)``),
one copy for every worker process. Like Beam's own handler, a handler built for the GPU runs on the
CPU where no GPU is usable, with Beam's own warning (:func:`fall_back_to_cpu`: in the worker, at
load time -- the launcher may have none -- before anything loads, in every share mode). Other
handlers go to a GPU only when asked (``SharedModelHandler(..., device="cuda:N")``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import modelshare
from modelshare import DeviceUnavailableError

__all__ = ["GPU_UNAVAILABLE", "fall_back_to_cpu", "handler_device", "usable_device"]

#: what Beam's PyTorch handlers log when they were built for a GPU the machine does not have
GPU_UNAVAILABLE = "Model handler specified a 'GPU' device, but GPUs are not available. Switching to CPU."


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


def fall_back_to_cpu(handler: Any) -> bool:
    """Beam's fallback for a PyTorch handler built for the GPU where CUDA cannot allocate: Beam's
    warning, and the handler (its model and its batches) moved to the CPU. Whether it fell back."""
    if not _is_pytorch_handler(handler) or getattr(getattr(handler, "_device", None), "type", None) != "cuda":
        return False
    try:  # Beam's own test, so that wrapped and unwrapped agree on what a usable GPU is
        from apache_beam.ml.inference.pytorch_inference import _cuda_device_is_usable as usable
    except ImportError:
        import torch

        usable = torch.cuda.is_available
    if usable():
        return False
    logging.warning(GPU_UNAVAILABLE)
    import torch

    handler._device = torch.device("cpu")
    return True


def usable_device(handler: Any, device: Optional[str], asked: bool, key: str) -> Optional[str]:
    """``device`` where this machine has it; else, for a device the handler itself chose (not
    ``asked`` for), None -- the CPU, as Beam's handler falls back -- with the handler moved there too."""
    if device is None or asked:
        return device
    try:
        modelshare.check_device(device, key=key)
    except DeviceUnavailableError:
        logging.warning(GPU_UNAVAILABLE)
        import torch

        handler._device = torch.device("cpu")
        return None
    return device
