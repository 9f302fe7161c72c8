"""An ASGI app serving a shared model: each worker acquires it in the lifespan's startup.

    uvicorn --workers 4 examples.asgi_app:app      # from the repository root

uvicorn starts each worker afresh (spawn), so the first worker to start loads the model and the
others attach; a worker holds it from startup to shutdown. ``/predict?seed=N`` answers,
``/metrics`` shows the machine's modelshare figures. No web framework: plain ASGI.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from examples.serving import request_input, seed_of, shared
from modelshare.metrics import ModelShareCollector

registry = CollectorRegistry()
registry.register(ModelShareCollector())
model: Any = None


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """The ASGI entry point: the lifespan holds the model; ``/predict`` and ``/metrics``."""
    global model
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                model = shared.acquire()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn then ends the worker by re-raising SIGTERM, which skips exit handlers: let go now
                shared.release(model, linger=0)
                model = None
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/predict":
        seed = seed_of(scope.get("query_string", b"").decode())
        body = json.dumps({"pid": os.getpid(), "output": float(model(request_input(seed)).sum())}).encode()
        kind = b"application/json"
    elif scope["path"] == "/metrics":
        body, kind = generate_latest(registry), CONTENT_TYPE_LATEST.encode()
    else:
        body, kind = b"try /predict?seed=N or /metrics\n", b"text/plain"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": body})
