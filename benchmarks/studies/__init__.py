"""Studies: one question each, measured side by side with a peer in the same run (``python -m
benchmarks.studies.<name>``): ``attach`` (attaching vs. a private load), ``beam_pipeline`` (a real
Beam pipeline, four ways), ``keyed_pipeline`` (keyed models under a memory cgroup), ``server_calls``
(server mode vs. Beam's ``MultiProcessShared`` per call), ``onnx_prepack`` (ONNX Runtime's
prepacking), ``alignment_probe`` (buffer alignment and speed)."""
