"""``python -m sparsity_app``: the same as the ``sparsity-core`` command."""

import sys

from .cli import main

sys.exit(main())
