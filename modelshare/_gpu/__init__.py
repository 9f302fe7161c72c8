"""GPU copies: one copy of a model's weights per GPU, mapped by every process that computes on it.

* ``cuda``: the few CUDA driver calls a copy needs (VMM memory exported as a descriptor), by ctypes;
* ``copies``: making, admitting and mapping a copy (``Processes(device="cuda:N")``);
* ``keeper``: the context-free process that hands a copy's descriptor to every process that maps it.

Nothing here is imported by ``import modelshare``: only when a model is asked for on a GPU, or a
GPU copy is listed (``modelshare ls``).
"""
