"""Host memory: a directory of segments, one file per model version, that every process maps.

* ``directory``: where the directory is, and the names of the files in it (the one place that
  makes and reads them);
* ``trust``: the threat model and its checks -- the directory is this user's alone, files are
  opened without following links, only modelshare's own files in a dedicated directory are swept;
* ``format``: one segment file -- written atomically, validated and mapped read-only;
* ``locks``: ``flock``s that say who holds what, read back from the kernel;
* ``waiting``: one deadline for every wait (``timeout=None``: as long as it takes);
* ``segments``: publish a model version once per machine, or attach to it;
* ``holds``: a process's hold on a segment, and giving it back (the last holder unlinks);
* ``inventory``: what a directory holds, eviction and garbage collection;
* ``counts``: machine-wide counts of loads, attaches and evictions per key (for metrics and ``top``);
* ``heap``: freed heap given back to the system after a load (and before a router measures one).
"""
