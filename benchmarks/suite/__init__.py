"""The OOM suite (``python -m benchmarks``): the four memory scenarios, each approach in its own
memory cgroup, limited so that private copies cannot fit.

* ``cli``: the command line; ``run``: one approach of one scenario (its workers, its cgroup,
  its samples); ``worker``: one worker process; ``approaches``: how a worker gets its model (the
  usual ways, Beam's own mechanisms, modelshare's); ``scenarios/``: the four scenarios and their
  limits; ``report``: the table, JSON and plots; ``beam_keyed``: Beam's keyed handler as a worker
  runs it.
"""
