"""The sparsity-core application: the ``sparsity-core`` command, its main job and benchmarks.

It is built on the library's public API only (``sparsity_core`` and its modules); nothing in
the library imports it. Modules: :mod:`~sparsity_app.cli` (the command),
:mod:`~sparsity_app.train` (the main job), :mod:`~sparsity_app.data` and
:mod:`~sparsity_app.models` (its offline datasets and models), :mod:`~sparsity_app.progress` and
:mod:`~sparsity_app.tables` (terminal output), :mod:`~sparsity_app.bench` (the training
benchmark).
"""
