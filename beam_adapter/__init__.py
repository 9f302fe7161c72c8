"""Apache Beam adapter for modelshare: RunInference with models loaded once per machine.

    from beam_adapter import SharedModelHandler
    predictions = examples | RunInference(SharedModelHandler(your_model_handler))

Importing this package imports Apache Beam (``pip install "modelshare[beam]"``); ``modelshare``
itself never does.
"""

try:
    import apache_beam  # noqa: F401  (the adapter's one requirement beyond modelshare)
except ImportError as exc:
    raise ImportError('beam_adapter needs Apache Beam: pip install "modelshare[beam]"') from exc

from ._batches import Pad  # noqa: E402
from ._handler import SharedModelHandler, release_all  # noqa: E402

__all__ = ["SharedModelHandler", "Pad", "release_all"]
