"""Apache Beam adapter for modelshare: RunInference with models loaded once per machine.

    from beam_adapter import SharedModelHandler
    predictions = examples | RunInference(SharedModelHandler(your_model_handler))

Importing this package imports Apache Beam (``pip install -e '.[beam]'``); ``modelshare`` itself
never does.
"""

from ._batches import Pad
from ._handler import SharedModelHandler, release_all

__all__ = ["SharedModelHandler", "Pad", "release_all"]
