"""Time the testing kit on the example plugin's three components (default ``dev`` profile).

    pip install -e examples/sparsity_explore && python benchmarks/bench_kit.py [profile]

Prints the seconds ``check_component`` takes for each component, the slowest checks, and the
total (imports excluded).
"""

from __future__ import annotations

import sys
import time

from sparsity_explore import ExploreGrowth, RelativeMagnitudePrune, dst_ee

from sparsity_core.testing import check_component
from sparsity_core.testing.profiles import load_profile


def main(profile: str = "dev") -> float:
    """Run every applicable check on the three components; return the total seconds."""
    load_profile(profile)
    start = time.perf_counter()
    results = []
    for component in (RelativeMagnitudePrune(), ExploreGrowth(), dst_ee):
        began = time.perf_counter()
        checked = check_component(component)
        results += checked
        print(f"{checked[0].component}: {len(checked)} checks, {time.perf_counter() - began:.1f} s")
    total = time.perf_counter() - start
    for r in sorted(results, key=lambda r: -r.seconds)[:5]:
        print(f"  {r.seconds:5.2f} s  {r.examples:3d} examples  {r.component} {r.check}")
    print(f"total: {total:.1f} s in the {profile!r} profile")
    return total


if __name__ == "__main__":
    main(*sys.argv[1:2])
