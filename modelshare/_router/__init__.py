"""Keyed models under a machine-wide byte budget.

* ``router``: ``ModelRouter`` -- key to model, and the acquire that admits, loads and evicts;
* ``admission``: the policy as pure functions: size estimates, what a load needs, what to evict;
* ``ledger``: what the directory cannot tell (last use, measured sizes, counters, loads in
  flight), one locked file written atomically;
* ``membership``: who routes through a directory; the last one out evicts what routers kept warm.
"""
