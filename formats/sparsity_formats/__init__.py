"""Built-in sparsity-core storage formats, each registered through its own entry point."""

__all__: list[str] = []
