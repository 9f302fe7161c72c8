"""A WSGI app serving a shared model, and the machine's modelshare metrics for Prometheus.

    gunicorn --preload --workers 4 examples.wsgi_app:app      # from the repository root

``/predict?seed=N`` answers with the model's output; ``/metrics`` with ``ModelShareCollector``'s
figures (machine-wide: any worker says the same). With ``--preload`` and ``$EXAMPLE_HOLD=1`` the
master loads the model at import and the forked workers inherit it (one load, no attach); without,
each worker's first request attaches to the segment the first one published. After a deploy of
new weights, a gunicorn config with ``def post_fork(server, worker): shared.refresh()`` moves the
new workers that HUP forks to them (``examples.serving.shared`` is the SharedModel).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from examples.serving import answer, seed_of
from modelshare.metrics import ModelShareCollector

registry = CollectorRegistry()
registry.register(ModelShareCollector())


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI entry point: ``/predict`` and ``/metrics``."""
    path = environ.get("PATH_INFO", "/")
    if path == "/predict":
        body, kind = answer(seed_of(environ.get("QUERY_STRING", ""))), "application/json"
    elif path == "/metrics":
        body, kind = generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /predict?seed=N or /metrics\n"]
    start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
