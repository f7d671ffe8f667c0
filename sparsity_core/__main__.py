"""``python -m sparsity_core``: a deprecated alias of ``python -m sparsity_app``.

The ``sparsity-core`` command and its main job belong to the application (:mod:`sparsity_app`),
which the library never imports; this alias finds it by name at run time and says where it moved.
"""

import runpy
import warnings

warnings.warn(
    "`python -m sparsity_core` is deprecated: the command line moved to the application, run "
    "`sparsity-core ...` or `python -m sparsity_app ...`.",
    DeprecationWarning,
    stacklevel=1,
)
runpy.run_module("sparsity_app", run_name="__main__", alter_sys=True)
