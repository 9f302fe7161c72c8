"""On a GPU machine: ``bash benchmarks/gpu/check.sh`` runs every GPU check in one go -- ``probe``
(the CUDA VMM path step by step), the GPU tests, and ``benchmark`` (``python -m benchmarks.gpu``:
one copy of a model for N processes vs. private copies and Beam's ``MultiProcessShared``);
``workers``: the processes both start."""
