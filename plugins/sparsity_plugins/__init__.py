"""Built-in sparsity-core components, each module registered through its own entry point.

Nothing here is imported by :mod:`sparsity_core` directly: the plugin manager finds these
modules exactly as it finds third-party plugins.
"""

__all__: list[str] = []
