"""One global budget over many layers: integer apportionment with per-layer step sizes.

A constant fan-in layer can only hold a multiple of its active neurons (``k`` per neuron), so
rounding each layer alone loses up to half a neuron's worth of inputs per neuron, and neuron
ablation leaves ``budget mod active`` unused. :func:`apportion` rounds all layers together:
each layer ``l`` starts from a value ``v_l`` and may move by whole steps ``delta * step_l``
(``delta`` in its allowed set); it picks the moves whose total comes closest to the target
from below, and among those the one nearest each layer's own ideal. Layers whose step is 1
(unstructured) absorb whatever remains, exactly.

The search is exact (a dynamic programme over reachable totals) while its work (reachable
totals times choices, summed over layers) stays under :data:`MAX_WORK`; past that (many wide
layers, where one layer's rounding is negligible) it falls back to a greedy pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = ["MAX_WORK", "Item", "apportion", "ceiling", "span"]

MAX_WORK = 500_000


@attrs.frozen
class Item:
    """One layer: its current count ``value``, ``step`` (0: fixed), the allowed multiples of
    the step (``deltas``, 0 included) and its ``ideal`` count (the tie-breaker)."""

    value: int
    step: int
    deltas: tuple[int, ...] = (0,)
    ideal: float = 0.0
    low: int = 0
    high: int = 0


def span(step: int, reach: int) -> int:
    """How many of its steps a layer may move: two, or one step of the widest layer (``reach``
    weights) when that is more, so a narrow layer can make up what wide layers cannot hit."""
    return max(2, reach // step)


def ceiling(planned: int, widest_step: int, reach: int) -> int:
    """The most weights a layer may ever hold once the global apportionment moves its budget:
    its planned share plus two of its widest steps (``widest_step``: one weight per neuron of
    the whole layer under constant fan-in, 1 when unstructured) or one step of the model's
    widest layer (``reach``), whichever is more. A compact layer's capacity is this."""
    return planned + max(2 * widest_step, reach)


def _free(item: Item) -> bool:
    return item.step == 1


def _cost(item: Item, delta: int) -> float:
    return abs(item.value + delta * item.step - item.ideal)


def _dp(items: Sequence[Item], room: int, lowest: int | None = None) -> list[int] | None:
    """The deltas whose total offset is the largest one <= ``room`` (ties: least cost); with
    ``lowest``, any offset in ``[lowest, room]`` is as good, and the one of least cost wins
    (free layers make up the rest)."""
    stages: list[dict[int, tuple[float, int, int]]] = []
    states: dict[int, tuple[float, int, int]] = {0: (0.0, 0, 0)}
    work = 0
    for item in items:
        work += len(states) * len(item.deltas)
        if work > MAX_WORK:
            return None
        nxt: dict[int, tuple[float, int, int]] = {}
        for offset, (cost, _, _) in states.items():
            for delta in item.deltas:
                o = offset + delta * item.step
                c = cost + _cost(item, delta)
                best = nxt.get(o)
                if best is None or c < best[0] - 1e-12:
                    nxt[o] = (c, offset, delta)
        stages.append(nxt)
        states = nxt
    fitting = [o for o in states if o <= room]
    if not fitting:
        fitting = [min(states)]
    target = max(fitting)
    if lowest is not None:
        within = [o for o in fitting if o >= lowest]
        if within:
            target = min(within, key=lambda o: (states[o][0], abs(o)))
    deltas = []
    for stage in reversed(stages):
        _, prev, delta = stage[target]
        deltas.append(delta)
        target = prev
    return deltas[::-1]


def _greedy(items: Sequence[Item], room: int) -> list[int]:
    """Largest steps first, each moved once toward the target when that does not overshoot."""
    deltas = [0] * len(items)
    order = sorted(range(len(items)), key=lambda i: -items[i].step)
    for i in order:
        item = items[i]
        for delta in sorted(item.deltas, key=lambda d: (-d * item.step, _cost(item, d))):
            if delta * item.step <= room:
                deltas[i] = delta
                room -= delta * item.step
                break
    return deltas


def apportion(items: Sequence[Item], target: int) -> list[int]:
    """New counts for ``items`` with their sum as close to ``target`` as the steps allow,
    never above it unless even the smallest choice is (then the smallest choice)."""
    grouped = [i for i, item in enumerate(items) if item.step > 1 and len(item.deltas) > 1]
    free = [i for i, item in enumerate(items) if _free(item)]
    counts = [item.value for item in items]
    room = target - sum(counts)
    free_up = sum(items[i].high - items[i].value for i in free)
    free_down = sum(items[i].value - items[i].low for i in free)
    if grouped and not (-free_down <= room <= free_up):
        chosen = [items[i] for i in grouped]
        # Free layers take any remainder, so grouped moves may overshoot by what they can give.
        limit = room + free_down
        deltas = _dp(chosen, limit, lowest=room - free_up)
        if deltas is None:
            deltas = _greedy(chosen, limit)
        for i, delta in zip(grouped, deltas, strict=True):
            counts[i] += delta * items[i].step
        room = target - sum(counts)
    # One weight at a time to the free layer furthest below (or above) its ideal.
    while room and free:
        sign = 1 if room > 0 else -1
        able = [
            i for i in free if (counts[i] < items[i].high if sign > 0 else counts[i] > items[i].low)
        ]
        if not able:
            break
        i = max(able, key=lambda j: sign * (items[j].ideal - counts[j]))
        counts[i] += sign
        room -= sign
    return counts
