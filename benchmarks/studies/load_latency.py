"""What Beam's ``load_model_latency_milli_secs`` says per worker: Beam's own load against the
wrapped handler's load (the first worker) and attach (every other one).

A PyTorch MLP through RunInference on the DirectRunner with ``direct_num_workers`` worker
processes (``multi_processing``); Beam's distribution of load latencies, one value per worker
process that loaded, is read from the pipeline's metrics. ``modelshare-attach-only``: this process
holds the model first, so every worker attaches.

Run: ``python -m benchmarks.studies.load_latency [--size-mib 16] [--workers 2] [--runs 3]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

CONFIGS = ["beam", "modelshare", "modelshare-attach-only"]


def run_once(config: str, path: Path, size_mib: int, workers: int) -> dict[str, Any]:
    """One pipeline; the load latencies Beam and modelshare report (milliseconds)."""
    import apache_beam as beam
    import torch
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_adapter import SharedModelHandler, release_all

    from .beam_pipeline import handler_for

    handler = handler_for("torch", "beam-default", str(path), size_mib, 512, 0)
    wrapped = handler if config == "beam" else SharedModelHandler(handler)
    held = wrapped.load_model() if config == "modelshare-attach-only" else None
    try:
        pipeline = beam.Pipeline(options=PipelineOptions(direct_num_workers=workers,
                                                         direct_running_mode="multi_processing"))
        _ = (pipeline | beam.Create([torch.ones(512)] * 64) | beam.Reshuffle() | RunInference(wrapped)
             | beam.Map(lambda r: None))
        outcome = pipeline.run()
        outcome.wait_until_finish()
    finally:
        del held
        release_all()
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(handler.get_metrics_namespace()))
    values = {m.key.metric.name: m.committed for m in metrics["distributions"]}
    row: dict[str, Any] = {"config": config}
    for name in ("load_model_latency_milli_secs", "modelshare_load_latency_ms", "modelshare_attach_latency_ms"):
        if name in values:
            row[name] = (values[name].count, values[name].min, values[name].max)
    return row


def main(argv: Optional[list[str]] = None, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    import torch

    from .beam_pipeline import MLP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mlp.pt"
        torch.save(MLP(args.size_mib, 512).state_dict(), path)
        rows = [run_once(config, path, args.size_mib, args.workers) for _ in range(args.runs) for config in CONFIGS]
    report(f"{args.size_mib} MiB PyTorch MLP, {args.workers} workers, {args.runs} runs each; (count, min, max) ms\n")
    report("| configuration | Beam's load_model_latency_milli_secs | modelshare_load_latency_ms "
           "| modelshare_attach_latency_ms |")
    report("|---|---|---|---|")
    for row in rows:
        report(f"| {row['config']} | {row.get('load_model_latency_milli_secs', '-')} "
               f"| {row.get('modelshare_load_latency_ms', '-')} | {row.get('modelshare_attach_latency_ms', '-')} |")
    return rows


if __name__ == "__main__":
    main()
