"""Owner processes: a small process that owns something for one model version on behalf of every
process on the machine, and how the others reach it.

* ``owner``: an owner's files (socket, status, start lock), starting one and finding them all;
* ``server``: the model server (``share="server"``), one process per copy of a model;
* ``client``: what a process calls instead of the model: it sends each call to the least busy copy;
* ``wire``: how a call travels -- a Unix socket for small messages, a shared-memory arena for arrays.

The keeper of a GPU copy is an owner too; it lives with the GPU code (``_gpu.keeper``).
"""
