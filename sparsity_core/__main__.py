"""``python -m sparsity_core``: the ``sparsity-core`` command, which the application provides.

This is the library's one door to the application (:mod:`sparsity_app`): the library itself
never imports it.
"""

import sys

from sparsity_app.cli import main

sys.exit(main())
