"""The core layer: Hessian-diagonal estimation, sensitivity metrics, rank allocation and the
``allocate`` pipeline, with the small utilities they share (errors, atomic writes and the cache
folder, process groups, timers).

Layers, lowest first: ``core`` <- ``data`` <- ``training`` <- ``bench`` <- ``cli``. A module imports
only its own layer and lower ones (tests/test_layers.py checks it); ``core`` imports no other layer.
"""
