"""Property tests of the structure constraints: N:M, constant fan-in, neuron ablation (SRigL),
their composition, per-layer rules and whole structured runs (issue 3).

The structure checks here are independent of the structures' own ``satisfied()``: they count
active weights per M-group and per output neuron themselves, so a structure whose ``fill`` and
``satisfied`` agree on a wrong pattern still fails (see ``TestTheChecksCanFail``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import sparsity_core
from sparsity_core import (
    ComponentType,
    ConfigError,
    DSTConfig,
    DSTScheduler,
    LayerError,
    LayerSpec,
    get_registry,
    hookimpl,
)
from sparsity_core.config import LayerRule
from sparsity_core.engine import plan_initial_mask
from sparsity_core.selection import count
from sparsity_core.structures import active_rows_of, compose_structures
from sparsity_core.testing import check_checkpoint_resume, check_method_run
from sparsity_core.testing import strategies as sst
from sparsity_plugins.structure_ablation import AblatedStructure, NeuronAblation
from sparsity_plugins.structure_fan_in import ConstantFanIn
from sparsity_plugins.structure_nm import NM
from sparsity_plugins.structure_unstructured import Unstructured

REGISTRY = get_registry()
BATCH = 8
STRUCTURED_PRESETS = ["srigl", "srigl_no_ablation", "nm_rigl", "nm_set"]


def structure(name: str, **params: Any) -> Any:
    return REGISTRY.create(ComponentType.STRUCTURE, name, **params)


# -- strategies --------------------------------------------------------------------------------

nm_structures = st.integers(min_value=2, max_value=8).flatmap(
    lambda m: st.builds(NM, n=st.integers(min_value=1, max_value=m), m=st.just(m))
)
ablations = st.builds(
    NeuronAblation,
    gamma_sal=st.one_of(st.sampled_from([0.0, 0.3, 1.0]), st.floats(0.0, 1.0)),
    min_active_fraction=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)),
)
ablated_structures = st.builds(
    lambda ablation, inner: compose_structures((ablation, inner)),
    ablations,
    st.one_of(st.just(ConstantFanIn()), nm_structures),
)
fractions = st.one_of(st.sampled_from([0.0, 0.3, 1.0]), st.floats(0.0, 1.0))


@st.composite
def update_plans(draw: Any, spec: LayerSpec, *, max_size: int = 4) -> list[tuple[Any, ...]]:
    """A sequence of ``(prune scores, grow scores, fraction)``: ties, zeros, NaN and Inf included.

    Now and then some neurons get all-zero scores in both (a dead neuron: ablation's target).
    """
    plans = []
    for _ in range(draw(st.integers(min_value=1, max_value=max_size), label="updates")):
        prune = draw(sst.scores(spec.shape, nonfinite=st.booleans()), label="prune")
        grow = draw(sst.scores(spec.shape, nonfinite=st.booleans()), label="grow")
        if draw(st.booleans(), label="dead rows"):
            dead = draw(
                st.lists(st.integers(0, spec.fan_out - 1), min_size=1, unique=True), label="dead"
            )
            prune, grow = prune.clone(), grow.clone()
            prune[dead] = 0.0
            grow[dead] = 0.0
        plans.append((prune, grow, draw(fractions, label="fraction")))
    return plans


# -- independent structure checks ------------------------------------------------------------------


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1)


def _parts(s: Any) -> tuple[NeuronAblation | None, Any]:
    """``(ablation or None, fine structure)`` of a (possibly composed) structure."""
    if isinstance(s, AblatedStructure):
        return s.ablation, s.inner
    return None, s


def _exempt(ablation: NeuronAblation | None, spec: LayerSpec) -> bool:
    return ablation is None or any(fnmatch.fnmatchcase(spec.fqn, p) for p in ablation.exempt)


def assert_structure_holds(s: Any, spec: LayerSpec, mask: torch.Tensor, budget: int) -> None:
    """Count per M-group / per neuron and compare with what the structure promises."""
    assert mask.dtype == torch.bool and tuple(mask.shape) == spec.shape
    ablation, fine = _parts(s)
    active = active_rows_of(mask)
    n_active = int(active.sum())
    if _exempt(ablation, spec):
        assert bool(active.all()) or isinstance(fine, Unstructured), (
            f"{spec.fqn}: neurons {torch.nonzero(~active).flatten().tolist()} are empty although "
            f"no neuron may be ablated"
        )
    else:
        fewest = max(1, math.ceil(ablation.min_active_fraction * spec.fan_out))
        if isinstance(fine, ConstantFanIn):
            # The documented floor also names ceil(budget / fan_in) for N:M: see
            # test_nm_ablation_keeps_the_documented_floor_of_active_neurons.
            fewest = max(fewest, math.ceil(budget / spec.fan_in))
        assert n_active >= fewest, f"{spec.fqn}: {n_active} active neurons, fewer than {fewest}"
    if isinstance(fine, NM):
        per_group = fine.m if budget == spec.numel else fine.n
        groups = mask.reshape(spec.fan_out, spec.fan_in // fine.m, fine.m).sum(dim=2)
        expected = active.long().reshape(-1, 1) * per_group
        bad = torch.nonzero(groups != expected)
        assert bad.numel() == 0, (
            f"{spec.fqn}: group {bad[0].tolist()} (row, group) holds "
            f"{int(groups[tuple(bad[0])])} active of {fine.m}, not {int(expected[bad[0, 0], 0])}"
        )
        # The same groups as weight.reshape(-1, M): consecutive positions along the fan-in.
        flat = mask.reshape(-1, fine.m).sum(dim=1)
        assert torch.equal(flat, groups.reshape(-1))
        realized = per_group * (spec.fan_in // fine.m) * n_active
    elif isinstance(fine, ConstantFanIn):
        k = budget // (n_active if ablation is not None else spec.fan_out)
        counts = _rows(mask).sum(dim=1)
        assert torch.equal(counts, active.long() * k), (
            f"{spec.fqn}: active neurons hold {sorted(set(counts[active].tolist()))} inputs, not "
            f"exactly k={k}"
        )
        realized = k * n_active
        assert budget - n_active < realized <= budget
    else:
        realized = budget
    assert int(mask.sum()) == realized, f"{spec.fqn}: {int(mask.sum())} active, not {realized}"
    assert realized <= budget


def apply_update(
    s: Any,
    spec: LayerSpec,
    mask: torch.Tensor,
    budget: int,
    prune: torch.Tensor,
    grow: torch.Tensor,
    fraction: float,
) -> torch.Tensor:
    """One drop-then-grow update driven directly through ``keep`` and ``fill``; checked."""
    keep = s.keep(prune, mask, fraction, spec)
    assert keep.dtype == torch.bool and not bool((keep & ~mask).any()), "keep() added positions"
    new = s.fill(grow, keep, ~mask, budget, spec, previous=mask)
    dropped, grown = mask & ~new, new & ~mask
    # fill() removes kept positions only to ablate a whole neuron.
    lost = _rows(keep & ~new).any(dim=1)
    assert not bool((lost & active_rows_of(new)).any()), "fill() removed kept positions"
    assert not bool((dropped & ~mask).any()), "dropped a position that was not active"
    assert not bool((grown & mask).any()), "grew a position that was active before the update"
    assert not bool((new & ~keep & mask).any()), "regrew a weight dropped in the same update"
    assert_structure_holds(s, spec, new, budget)
    assert s.satisfied(new, spec, budget), "the structure's own satisfied() rejects its mask"
    return new


def assert_update_sequence(
    s: Any, spec: LayerSpec, mask: torch.Tensor, budget: int, plans: list[tuple[Any, ...]]
) -> torch.Tensor:
    """Run ``plans`` from ``mask``; the structure must hold, and an ablated neuron may come
    back only when the update's top growth scores give it enough salient weights."""
    assert_structure_holds(s, spec, mask, budget)
    for prune, grow, fraction in plans:
        before = active_rows_of(mask)
        n_drop = count(mask) - count(s.keep(prune, mask, fraction, spec))
        new = apply_update(s, spec, mask, budget, prune, grow, fraction)
        revived = active_rows_of(new) & ~before
        if bool(revived.any()) and isinstance(s, AblatedStructure):
            # Independent of the structure: a revived neuron held nothing, so its salient
            # weights are among the layer's n_drop highest growth scores (ties counted;
            # non-finite scores rank lowest, the documented policy).
            finite = grow.float().isfinite()
            flat = torch.where(finite, grow.float(), -math.inf).reshape(-1)
            cutoff = flat.topk(n_drop).values.min() if n_drop else math.inf
            ranked = torch.where(finite, grow.float(), -math.inf)
            top = (ranked >= cutoff).reshape(spec.fan_out, -1).sum(dim=1)
            k = budget // spec.fan_out
            # gamma_sal = 0 is the documented "ablate nothing": every neuron may come back.
            gamma = s.ablation.gamma_sal
            need = 0 if gamma == 0.0 else max(1, math.floor(gamma * k + 1e-9))
            assert bool((top[revived] >= need).all()), (
                f"{spec.fqn}: neurons {torch.nonzero(revived).flatten().tolist()} came back "
                f"without {need} salient weights"
            )
        mask = new
    return mask


def assert_constant_fan_in_budget(s: Any, spec: LayerSpec, density: float) -> int:
    budget = s.budget(spec, density)
    k = math.floor(density * spec.fan_in + 0.5)
    assert budget == k * spec.fan_out, f"budget {budget} is not round(density*fan_in)*fan_out"
    assert abs(budget - density * spec.numel) <= spec.fan_out / 2
    return budget


# -- N:M -------------------------------------------------------------------------------------------


class TestNM:
    """N:M keeps exactly N of every M consecutive fan-in positions, initially and after updates."""

    @given(data=st.data(), nm=nm_structures, seed=sst.seeds())
    def test_initial_mask_has_exactly_n_in_every_group_of_m(self, data, nm, seed):
        spec = data.draw(sst.structured_specs(nm), label="spec")
        nm.validate(spec)
        budget = nm.budget(spec, nm.n / nm.m)
        assert budget == spec.numel // nm.m * nm.n
        mask = plan_initial_mask(spec, nm, budget, seed, torch.device("cpu"))
        assert_structure_holds(nm, spec, mask, budget)
        assert bool((mask.reshape(-1, nm.m).sum(dim=1) == nm.n).all())

    @given(data=st.data(), nm=nm_structures)
    def test_every_group_keeps_exactly_n_across_update_sequences(self, data, nm):
        spec = data.draw(sst.structured_specs(nm), label="spec")
        mask = data.draw(sst.structured_masks(nm, spec), label="mask")
        budget = int(mask.sum())
        assert_update_sequence(nm, spec, mask, budget, data.draw(update_plans(spec), label="plans"))

    @given(
        m=st.integers(min_value=2, max_value=8),
        data=st.data(),
        layer_type=st.sampled_from(["Linear", "Conv2d"]),
    )
    def test_fan_in_not_divisible_by_m_is_a_layer_error_naming_layer_fan_in_and_m(
        self, m, data, layer_type
    ):
        spec = data.draw(sst.layer_specs(layer_types=layer_type, fqn="blocks.3.fc"), label="spec")
        assume(spec.fan_in % m)
        nm = NM(n=1, m=m)
        with pytest.raises(LayerError, match=rf"'blocks\.3\.fc'.*fan-in {spec.fan_in}.*M={m}"):
            nm.validate(spec)

    def test_scheduler_rejects_a_layer_whose_fan_in_m_does_not_divide(self):
        """The scheduler validates every layer at construction, before any mask exists."""
        model = nn.Sequential(nn.Linear(10, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = DSTConfig(
            structures=({"kind": "nm", "n": 2, "m": 4},),
            distribution="uniform",
            density=0.5,
            t_end=10,
        )
        with pytest.raises(LayerError, match=r"'0'.*fan-in 10.*M=4"):
            DSTScheduler(model, optimizer, config)

    @given(m=st.integers(min_value=1, max_value=8), extra=st.integers(min_value=1, max_value=8))
    def test_n_greater_than_m_is_a_config_error(self, m, extra):
        with pytest.raises(ConfigError, match=rf"n={m + extra} > m={m}"):
            structure("nm", n=m + extra, m=m)
        with pytest.raises(ConfigError, match="N <= M"):
            DSTConfig(structures=({"kind": "nm", "n": m + extra, "m": m},))

    @given(data=st.data(), nm=nm_structures, density=sst.densities(min_value=0.01))
    def test_density_other_than_n_over_m_is_a_layer_error_pointing_to_uniform(
        self, data, nm, density
    ):
        # nm.budget accepts densities within 1e-9 of N/M (float round-off), so those are not errors.
        assume(density != 1.0 and abs(density - nm.n / nm.m) > 1e-9)
        spec = data.draw(sst.structured_specs(nm, fqn="attn.q"), label="spec")
        with pytest.raises(LayerError, match=r"'attn\.q'.*distribution='uniform'"):
            nm.budget(spec, density)
        assert nm.budget(spec, 1.0) == spec.numel

    @given(
        nm=nm_structures,
        a_groups=st.integers(min_value=1, max_value=4),
        b_width=st.integers(min_value=2, max_value=12),
        b_density=sst.densities(min_value=0.1, max_value=0.9),
        seed=sst.seeds(),
    )
    def test_erk_with_an_nm_layer_and_an_unstructured_layer_hits_the_global_target(
        self, nm, a_groups, b_width, b_density, seed
    ):
        model = nn.Sequential(nn.Linear(nm.m * a_groups, 6), nn.Linear(6, b_width))
        total = sum(m.weight.numel() for m in model)
        density = model[0].weight.numel() * nm.n / nm.m + model[1].weight.numel() * b_density
        density /= total
        config = DSTConfig(
            density=density,
            distribution="erk",
            seed=seed % 2**16,
            t_end=10,
            rules=[LayerRule("0", structures=(nm,))],
        )
        scheduler = DSTScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
        layers = scheduler.layers
        assert layers["0"].budget == model[0].weight.numel() // nm.m * nm.n
        assert isinstance(layers["1"].structure, Unstructured)
        achieved = sum(int(layer.mask.sum()) for layer in layers.values())
        assert abs(achieved - density * total) <= len(layers)
        for layer in layers.values():
            assert_structure_holds(layer.structure, layer.spec, layer.mask, layer.budget)


# -- constant fan-in -------------------------------------------------------------------------------


class TestConstantFanIn:
    """Every output neuron keeps exactly k = round(density * fan_in) inputs."""

    @given(
        spec=sst.structured_specs(ConstantFanIn(), max_side=12),
        density=sst.densities(min_value=0.01),
    )
    def test_budget_is_k_times_fan_out_within_half_an_input_per_neuron(self, spec, density):
        assert_constant_fan_in_budget(ConstantFanIn(), spec, density)

    @given(data=st.data(), seed=sst.seeds())
    def test_initial_mask_gives_every_neuron_exactly_k_inputs(self, data, seed):
        s = ConstantFanIn()
        spec = data.draw(sst.structured_specs(s), label="spec")
        density = data.draw(sst.densities(min_value=1 / spec.fan_in), label="density")
        budget = assert_constant_fan_in_budget(s, spec, density)
        mask = plan_initial_mask(spec, s, budget, seed, torch.device("cpu"))
        assert_structure_holds(s, spec, mask, budget)

    @given(data=st.data())
    def test_every_neuron_keeps_exactly_k_inputs_across_update_sequences(self, data):
        s = ConstantFanIn()
        spec = data.draw(sst.structured_specs(s), label="spec")
        mask = data.draw(sst.structured_masks(s, spec), label="mask")
        budget = int(mask.sum())
        assert_update_sequence(s, spec, mask, budget, data.draw(update_plans(spec), label="plans"))


# -- neuron ablation -------------------------------------------------------------------------------


def _dead_row_case(fan_out: int = 6, fan_in: int = 16, k: int = 4, seed: int = 0):
    """A Linear layer whose row 0 has zero weights and zero gradient, the others large ones."""
    spec = LayerSpec("fc", (fan_out, fan_in), "Linear")
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.shape, generator=gen).abs() + 1.0
    grad = torch.randn(spec.shape, generator=gen).abs() + 1.0
    weight[0] = 0.0
    grad[0] = 0.0
    empty = torch.zeros(spec.shape, dtype=torch.bool)
    mask = ConstantFanIn().fill(
        torch.rand(spec.shape, generator=gen), empty, ~empty, k * fan_out, spec
    )
    return spec, mask, k * fan_out, weight * mask, grad


class TestNeuronAblation:
    """Ablation keeps a constant fan-in (or N:M) on active neurons, revives only salient ones, never
    goes below the minimum of active neurons, and spares exempt layers."""

    @given(data=st.data(), s=ablated_structures)
    def test_active_neurons_hold_k_and_ablated_ones_nothing_across_updates(self, data, s):
        spec = data.draw(sst.structured_specs(s), label="spec")
        _, fine = _parts(s)
        if isinstance(fine, NM):
            density = data.draw(st.sampled_from([fine.n / fine.m] * 3 + [1.0]), label="density")
        else:
            density = data.draw(st.integers(1, spec.fan_in), label="k") / spec.fan_in
        budget = s.budget(spec, density)
        mask = data.draw(
            sst.structured_masks(s, spec, budget=budget, ablate=st.booleans()), label="mask"
        )
        assert_update_sequence(s, spec, mask, budget, data.draw(update_plans(spec), label="plans"))

    @given(data=st.data(), s=ablated_structures, name=st.sampled_from(["head", "blocks.2.out"]))
    def test_exempt_layers_never_lose_a_neuron(self, data, s, name):
        s = attrs.evolve(s, ablation=attrs.evolve(s.ablation, exempt=("head", "*.out")))
        spec = data.draw(sst.structured_specs(s, fqn=name), label="spec")
        mask = data.draw(sst.structured_masks(s, spec), label="mask")
        budget = int(mask.sum())
        final = assert_update_sequence(
            s, spec, mask, budget, data.draw(update_plans(spec), label="plans")
        )
        assert bool(active_rows_of(final).all())
        assert int(final.sum()) == budget

    @given(
        fan_out=st.integers(min_value=4, max_value=10),
        k=st.integers(min_value=1, max_value=8),
        seed=sst.seeds(),
    )
    def test_a_dead_neuron_is_ablated_and_its_budget_spread_over_the_others(self, fan_out, k, seed):
        spec, mask, budget, weight, grad = _dead_row_case(fan_out, 16, k, seed)
        s = compose_structures((NeuronAblation(), ConstantFanIn()))
        keep = s.keep(weight.abs(), mask, 0.5, spec)
        # Ablation needs every survivor refillable to the larger fan-in from its previously
        # inactive inputs (the documented rule); the infeasible case has its own test below.
        capacity = _rows(keep).sum(dim=1)[1:] + (spec.fan_in - k)
        assume(bool((capacity >= budget // (fan_out - 1)).all()))
        new = s.fill(grad.abs(), keep, ~mask, budget, spec, previous=mask)
        assert not bool(new[0].any()), "the dead neuron 0 was not ablated"
        assert_structure_holds(s, spec, new, budget)
        n_active = int(active_rows_of(new).sum())
        assert bool(_rows(new).sum(dim=1)[1:].max() == budget // n_active)
        assert budget // n_active > k or budget % n_active

    def test_no_ablation_when_survivors_could_not_be_refilled(self):
        """At k = fan_in / 2 with a salient survivor that lost all k inputs, k' = budget //
        (n - 1) would exceed what it can regrow without undoing its own drop, so nobody is
        ablated."""
        spec, mask, budget, _, grad = _dead_row_case(9, 16, 8, 0)
        s = compose_structures((NeuronAblation(), ConstantFanIn()))
        keep = mask.clone()
        keep[0] = False  # the dead neuron lost everything
        keep[1] = False  # and so did a healthy one: it can regrow only its 8 inactive inputs
        grad[1][mask[1]] = 100.0  # it stays salient: its dropped inputs have the top gradients
        new = s.fill(grad.abs(), keep, ~mask, budget, spec, previous=mask)
        assert bool(active_rows_of(new).all())
        assert_structure_holds(s, spec, new, budget)
        assert not bool((new & ~keep & mask).any())  # nothing dropped was regrown

    def test_nm_ablation_keeps_the_documented_floor_of_active_neurons(self):
        """At least ceil(budget / fan_in) neurons stay active (structure_ablation's docstring),
        also under N:M: 3:4 on a (2, 4) layer has budget 6, so both neurons must stay."""
        spec = LayerSpec("fc", (2, 4), "Linear")
        s = compose_structures((NeuronAblation(gamma_sal=1.0), NM(n=3, m=4)))
        budget = s.budget(spec, 0.75)
        gen = torch.Generator().manual_seed(0)
        empty = torch.zeros(spec.shape, dtype=torch.bool)
        mask = s.fill(torch.rand(spec.shape, generator=gen), empty, ~empty, budget, spec)
        weight = (torch.rand(spec.shape, generator=gen) + 1) * mask
        grad = torch.rand(spec.shape, generator=gen) + 1
        weight[1] = 0.0
        grad[1] = 0.0
        keep = s.keep(weight, mask, 0.25, spec)
        new = s.fill(grad, keep, ~mask, budget, spec, previous=mask)
        n_active = int(active_rows_of(new).sum())
        assert n_active >= math.ceil(budget / spec.fan_in), (
            f"{n_active} active neuron(s), below ceil(budget / fan_in) = "
            f"{math.ceil(budget / spec.fan_in)}"
        )

    def test_ablation_removes_only_the_neurons_the_rule_names(self):
        """Fan-in 40, budget 4 x 256, 48 dead neurons: exactly those go, and the 208 others keep
        208 x 4 = 832 weights. The 192 left over are the layer's to give (realized_budget);
        the scheduler moves them to other layers (tests/unit/test_budget_rule.py) instead of
        ablating more neurons to use them here."""
        spec, mask, budget, weight, grad = _dead_row_case(256, 40, 4, 0)
        weight[:48] = 0.0
        grad[:48] = 0.0
        s = compose_structures((NeuronAblation(), ConstantFanIn()))
        keep = s.keep(weight.abs(), mask, 0.5, spec)
        new = s.fill(grad.abs(), keep, ~mask | keep, budget, spec, previous=mask)
        assert_structure_holds(s, spec, new, budget)
        assert not bool(new[:48].any())
        assert int(active_rows_of(new).sum()) == 208
        assert int(new.sum()) == 832 == s.realized_budget(spec, budget, new)

    def test_min_active_fraction_one_forbids_ablation(self):
        """With min_active_fraction=1 even a dead neuron keeps its k inputs."""
        spec, mask, budget, weight, grad = _dead_row_case()
        s = compose_structures((NeuronAblation(min_active_fraction=1.0), ConstantFanIn()))
        new = apply_update(s, spec, mask, budget, weight.abs(), grad.abs(), 0.5)
        assert bool(active_rows_of(new).all())

    def test_a_run_ablates_a_neuron_that_never_matters(self):
        """SRigL through the scheduler ablates an output the loss ignores, and keeps it off."""
        scheduler = check_method_run(
            _srigl_ablating_outputs(),
            _dead_output_model,
            steps=12,
            optimizer_factory=_sgd,
            data=_batches((16,), 8, seed=0),
            loss_fn=_ignore_output_0,
        )
        layer = scheduler.layers["0"]
        assert not bool(layer.mask[0].any())
        assert all(r.active_neurons == 7 for r in scheduler.history)

    def test_checkpoint_keeps_ablated_neurons_ablated(self):
        """A resumed scheduler has the same active neurons and keeps the unused one ablated."""
        config = _srigl_ablating_outputs()
        model = _dead_output_model()
        optimizer = _sgd(model.parameters())
        scheduler = DSTScheduler(model, optimizer, config, total_steps=16)
        data = _batches((16,), 8, seed=1)
        _train(model, optimizer, scheduler, data, 4)
        rows = active_rows_of(scheduler.layers["0"].mask).clone()
        assert not bool(rows[0])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        model2 = _dead_output_model()
        optimizer2 = _sgd(model2.parameters())
        resumed = DSTScheduler.from_state_dict(model2, optimizer2, state["scheduler"])
        model2.load_state_dict(state["model"])
        assert torch.equal(active_rows_of(resumed.layers["0"].mask), rows)
        _train(model2, optimizer2, resumed, data, 8)
        assert not bool(active_rows_of(resumed.layers["0"].mask)[0])


# -- composition -----------------------------------------------------------------------------------


class TestComposition:
    """Structures compose coarse to fine; anything else is a ConfigError at construction."""

    @pytest.mark.parametrize(
        ("structures", "message"),
        [
            (("nm", "constant_fan_in"), "2 weight-level structures"),
            (("constant_fan_in", "nm"), "2 weight-level structures"),
            (("constant_fan_in", "neuron_ablation"), "coarse to fine"),
            (("neuron_ablation",), "no weight-level structure"),
            (("neuron_ablation", "unstructured"), "counts per neuron"),
            (("neuron_ablation", "neuron_ablation", "constant_fan_in"), "twice"),
            (("nm", "nm"), "2 weight-level"),
            (("constant_fan_in", "constant_fan_in"), "2 weight-level"),
            ((), "no structure"),
        ],
    )
    def test_invalid_combinations_are_config_errors(self, structures, message):
        with pytest.raises(ConfigError, match=message):
            DSTConfig(structures=structures)
        with pytest.raises(ConfigError, match=message):
            LayerRule("blocks.*", structures=structures)

    @pytest.mark.parametrize(
        ("structures", "name"),
        [
            (("neuron_ablation", "constant_fan_in"), "neuron_ablation + constant_fan_in"),
            (("neuron_ablation", "nm"), "neuron_ablation + nm 2:4"),
            (("constant_fan_in",), "constant_fan_in"),
            (("nm",), "nm 2:4"),
        ],
    )
    def test_valid_combinations_build(self, structures, name):
        config = DSTConfig(structures=structures)
        assert sparsity_core.structures.describe(compose_structures(config.structures)) == name

    @pytest.mark.parametrize("kwargs", [{}, {"structures": ("nm",), "dense": True}])
    def test_layer_rule_needs_exactly_one_of_structures_or_dense(self, kwargs):
        with pytest.raises(ConfigError, match="exactly one of structures"):
            LayerRule("embed", **kwargs)


# -- per-layer rules -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(width, width), "k": nn.Linear(width, width)})
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(width, 2 * width), "fc2": nn.Linear(2 * width, width)}
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + torch.tanh(self.attn["q"](h)) * self.attn["k"](h)
        return h + self.mlp["fc2"](torch.relu(self.mlp["fc1"](h)))


class TinyTransformer(nn.Module):
    """embed -> one block (attn.q/k, mlp.fc1/fc2) -> head, all Linear, fan-ins multiples of 16."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList([Block(width)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


RULES = (
    LayerRule("embed", dense=True),
    LayerRule("*.attn.*", structures=("nm",)),
    LayerRule("*.mlp.*", structures=("neuron_ablation", "constant_fan_in")),
)


class TestLayerRules:
    """Per-layer rules: a dense first layer, 2:4 attention, SRigL MLP, unstructured elsewhere."""

    @given(
        density=sst.densities(min_value=0.25, max_value=0.6),
        seed=sst.seeds(),
        delta_t=st.integers(min_value=2, max_value=3),
        optimizer=st.sampled_from(["sgd", "adam"]),
    )
    def test_each_layer_keeps_its_structure_after_every_update(
        self, density, seed, delta_t, optimizer
    ):
        config = sparsity_core.preset(
            "rigl", density=density, delta_t=delta_t, seed=seed % 2**16, rules=RULES
        )
        assert DSTConfig.from_dict(config.to_dict()) == config
        assert DSTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
        with watch_structures() as watcher:
            scheduler = check_method_run(
                config,
                _seeded(TinyTransformer, seed),
                steps=10,
                optimizer_factory=OPTIMIZERS[optimizer],
                data=_batches((16,), 3, seed),
            )
        assert watcher.updates > 0
        layers = scheduler.layers
        assert "embed" not in layers
        assert set(layers) == {
            "blocks.0.attn.q",
            "blocks.0.attn.k",
            "blocks.0.mlp.fc1",
            "blocks.0.mlp.fc2",
            "head",
        }
        for fqn in ("blocks.0.attn.q", "blocks.0.attn.k"):
            assert isinstance(layers[fqn].structure, NM)
            assert layers[fqn].budget == layers[fqn].spec.numel // 2
        for fqn in ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
            assert isinstance(layers[fqn].structure, AblatedStructure)
        assert isinstance(layers["head"].structure, Unstructured)
        total = sum(layer.spec.numel for layer in layers.values())
        assert abs(sum(layer.budget for layer in layers.values()) - density * total) <= sum(
            layer.spec.fan_out for layer in layers.values()
        )


# -- whole structured runs -------------------------------------------------------------------------


class StructuredNet(nn.Module):
    """Conv2d (fan-in 32) -> Linear (32) -> Linear head (32): every N:M with M <= 32 fits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 2)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(h)))


def _seeded(cls: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls()

    return build


def _batches(shape: tuple[int, ...], outputs: int, seed: int, count: int = 3) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((BATCH, *shape), generator=gen), torch.randn((BATCH, outputs), generator=gen))
        for _ in range(count)
    ]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


OPTIMIZERS = {"sgd": _sgd, "adam": _adam}


def _srigl_ablating_outputs() -> DSTConfig:
    """SRigL on a one-layer model, whose only layer is the output: ablation there allowed."""
    structures = [{"kind": "neuron_ablation", "exempt_output": False}, "constant_fan_in"]
    return sparsity_core.preset("srigl", density=0.25, delta_t=2, structures=structures)


def _dead_output_model() -> nn.Module:
    """One Linear(16, 8) whose output 0 starts at zero weight (and the loss ignores it)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[0] = 0.0
    return model


def _ignore_output_0(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs)[:, 1:], targets[:, 1:])


def _train(model, optimizer, scheduler, data, steps: int) -> None:
    for _ in range(steps):
        batch = data[scheduler.step_count % len(data)]
        optimizer.zero_grad()
        _ignore_output_0(model, batch).backward()
        optimizer.step()
        scheduler.step()


class _Watcher:
    """An observer plugin that checks every layer's structure independently after each update."""

    def __init__(self) -> None:
        self.updates = 0
        self.active: dict[tuple[int, str], torch.Tensor] = {}
        self.schedulers: list[DSTScheduler] = []

    @hookimpl
    def sparsity_after_mask_update(self, scheduler, step, records):
        self.updates += 1
        if all(s is not scheduler for s in self.schedulers):
            self.schedulers.append(scheduler)
        for fqn, layer in scheduler.layers.items():
            assert_structure_holds(layer.structure, layer.spec, layer.mask, layer.budget)
            self.active[(id(scheduler), fqn)] = active_rows_of(layer.mask).clone()


@contextlib.contextmanager
def watch_structures() -> Iterator[_Watcher]:
    watcher = _Watcher()
    manager = get_registry().plugin_manager
    manager.register(watcher)
    try:
        yield watcher
    finally:
        manager.unregister(watcher)


class TestStructuredRuns:
    """The structured presets keep structure and exact budgets through whole runs."""

    @given(
        name=st.sampled_from(STRUCTURED_PRESETS),
        density=sst.densities(min_value=0.1, max_value=0.6),
        seed=sst.seeds(),
        delta_t=st.integers(min_value=2, max_value=5),
        optimizer=st.sampled_from(["sgd", "adam"]),
        steps=st.integers(min_value=8, max_value=16),
        rate=st.sampled_from([0.2, 1.0]),
    )
    def test_structure_and_budget_hold_after_every_step_with_nan_gradients(
        self, name, density, seed, delta_t, optimizer, steps, rate
    ):
        config = sparsity_core.preset(name, density=density, delta_t=delta_t, seed=seed % 2**16)

        def poison(step: int, model: nn.Module) -> None:
            if step % delta_t:
                return
            gen = torch.Generator().manual_seed(seed + step)
            for module in model.modules():
                grad = getattr(getattr(module, "weight", None), "grad", None)
                if grad is not None:
                    grad.masked_fill_(torch.rand(grad.shape, generator=gen) < rate, float("nan"))

        with watch_structures() as watcher:
            scheduler = check_method_run(
                config,
                _seeded(StructuredNet, seed),
                steps=steps,
                optimizer_factory=OPTIMIZERS[optimizer],
                data=_batches((8, 5, 5), 3, seed),
                before_optimizer_step=poison,
            )
        assert scheduler.history and watcher.updates > 0

    @given(
        name=st.sampled_from(STRUCTURED_PRESETS),
        density=sst.densities(min_value=0.1, max_value=0.6),
        seed=sst.seeds(),
        delta_t=st.integers(min_value=2, max_value=5),
        optimizer=st.sampled_from(["sgd", "adam"]),
        data=st.data(),
    )
    def test_checkpoint_round_trip_continues_identically(
        self, name, density, seed, delta_t, optimizer, data
    ):
        config = sparsity_core.preset(name, density=density, delta_t=delta_t, seed=seed % 2**16)
        steps = data.draw(st.integers(min_value=6, max_value=12), label="steps")
        resume_at = data.draw(st.integers(min_value=1, max_value=steps - 1), label="resume_at")
        check_checkpoint_resume(
            config,
            _seeded(StructuredNet, seed),
            steps=steps,
            resume_at=resume_at,
            optimizer_factory=OPTIMIZERS[optimizer],
            data=_batches((8, 5, 5), 3, seed),
        )

    def test_checkpoint_round_trip_with_ablation_continues_identically(self):
        """The dead-output model ablates before the checkpoint; the resumed run matches."""
        check_checkpoint_resume(
            _srigl_ablating_outputs(),
            _dead_output_model,
            steps=12,
            resume_at=5,
            optimizer_factory=_sgd,
            data=_batches((16,), 8, seed=2),
            loss_fn=_ignore_output_0,
        )


class TestStructuredStrategies:
    """The kit's structure-aware strategies draw layers and masks that suit the structure."""

    @given(data=st.data(), s=st.one_of(nm_structures, ablated_structures, st.just(ConstantFanIn())))
    def test_specs_fit_the_groups_and_masks_satisfy_the_structure(self, data, s):
        spec = data.draw(sst.structured_specs(s), label="spec")
        assert spec.layer_type in ("Linear", "Conv2d")
        _, fine = _parts(s)
        assert spec.fan_in % getattr(fine, "m", 1) == 0
        mask = data.draw(sst.structured_masks(s, spec, ablate=st.booleans()), label="mask")
        assert s.satisfied(mask, spec, _budget_of(s, spec, mask))


def _budget_of(s: Any, spec: LayerSpec, mask: torch.Tensor) -> int:
    """The layer budget a drawn (possibly ablated) mask was filled for."""
    _, fine = _parts(s)
    if isinstance(fine, NM):
        return spec.numel if bool(mask.all()) else spec.numel // fine.m * fine.n
    rows = active_rows_of(mask)
    per_row = int(_rows(mask).sum(dim=1).max())
    budgets = [k * spec.fan_out for k in range(1, spec.fan_in + 1)]
    return next(b for b in budgets if b // int(rows.sum()) == per_row)


# -- the checks can fail ---------------------------------------------------------------------------


@attrs.frozen
class SkewedNM(NM):
    """Broken: group 0 gets N+1 and group 1 N-1 (budget and its own satisfied() agree)."""

    def group_counts(self, spec, budget, device, active_rows=None):
        counts = super().group_counts(spec, budget, device, active_rows).clone()
        counts[0] += 1
        counts[1] -= 1
        return counts


@attrs.frozen
class RegrowingFanIn(ConstantFanIn):
    """Broken: fill() ignores its candidates, so it may regrow what keep() just dropped."""

    def fill(self, scores, base, candidates, budget, spec, *, previous=None, active_rows=None):
        return super().fill(
            scores, base, torch.ones_like(candidates), budget, spec, active_rows=active_rows
        )


@attrs.frozen
class CeilFanIn(ConstantFanIn):
    """Broken: k = ceil(density * fan_in) instead of rounding."""

    def budget(self, spec, density):
        return math.ceil(density * spec.fan_in) * spec.fan_out


@attrs.frozen
class RevivingAblation(AblatedStructure):
    """Broken: fill() refills every neuron, reviving ablated ones that are not salient."""

    def fill(self, scores, base, candidates, budget, spec, *, previous=None, active_rows=None):
        return self.inner.fill(scores, base, candidates, budget, spec)


@attrs.frozen
class NoMinimumAblation(AblatedStructure):
    """Broken: ignores min_active_fraction."""

    def _min_rows(self, spec, budget):
        return self.inner.min_active_rows(spec, budget)


class TestTheChecksCanFail:
    """The property tests' checks reject deliberately broken structures."""

    def test_skewed_nm_groups_fail_the_nm_check(self):
        spec = LayerSpec("fc", (2, 8), "Linear")
        s = SkewedNM(n=2, m=4)
        empty = torch.zeros(spec.shape, dtype=torch.bool)
        mask = s.fill(torch.rand(spec.shape), empty, ~empty, 8, spec)
        assert s.satisfied(mask, spec, 8)  # its own check is fooled
        with pytest.raises(AssertionError, match="group"):
            assert_structure_holds(s, spec, mask, 8)

    def test_regrowing_a_dropped_weight_fails_the_update_check(self):
        spec, mask, budget, weight, _ = _dead_row_case()
        grow = mask.float()  # the just-dropped weights score highest for growth
        with pytest.raises(AssertionError, match=r"regrew|grew a position"):
            apply_update(RegrowingFanIn(), spec, mask, budget, weight.abs(), grow, 0.5)

    def test_ceil_budget_fails_the_constant_fan_in_budget_check(self):
        with pytest.raises(AssertionError, match="round"):
            assert_constant_fan_in_budget(CeilFanIn(), LayerSpec("fc", (4, 10)), 0.12)

    def test_reviving_ablated_neurons_fails_the_sequence_check(self):
        spec, _, budget, _, _ = _dead_row_case()
        s = RevivingAblation(NeuronAblation(), ConstantFanIn())
        gen = torch.Generator().manual_seed(0)
        rows = torch.ones(spec.fan_out, dtype=torch.bool)
        rows[0] = False
        empty = torch.zeros(spec.shape, dtype=torch.bool)
        mask = ConstantFanIn().fill(
            torch.rand(spec.shape, generator=gen), empty, ~empty, budget, spec, active_rows=rows
        )
        grow = torch.rand(spec.shape, generator=gen) + 1.0
        grow[0] = 0.0  # nothing salient in the ablated neuron 0: reviving it breaks the rule
        plans = [(torch.rand(spec.shape, generator=gen), grow, 0.5)]
        with pytest.raises(AssertionError, match="came back without"):
            assert_update_sequence(s, spec, mask, budget, plans)

    def test_ignoring_the_minimum_of_active_neurons_fails_the_check(self):
        spec, mask, budget, weight, grad = _dead_row_case()
        s = NoMinimumAblation(NeuronAblation(min_active_fraction=1.0), ConstantFanIn())
        with pytest.raises(AssertionError, match="fewer than"):
            apply_update(s, spec, mask, budget, weight.abs(), grad.abs(), 0.5)


def _padded_group_counts(mask: torch.Tensor, m: int) -> list[list[int]]:
    """Active positions per group of M along each row, the last group possibly partial."""
    rows = mask.reshape(mask.shape[0], -1)
    return [[int(row[i : i + m].sum()) for i in range(0, row.numel(), m)] for row in rows]


class TestNMPadding:
    """N:M with pad=True on fan-ins that M does not divide."""

    @given(
        fan_in=st.integers(min_value=5, max_value=23).filter(lambda f: f % 4),
        fan_out=st.integers(min_value=1, max_value=6),
        n=st.integers(min_value=1, max_value=3),
        seed=sst.seeds(),
    )
    def test_every_full_group_holds_n_and_the_partial_group_min_n_real(
        self, fan_in, fan_out, n, seed
    ):
        """Initial and updated masks hold N per full group and min(N, tail) in the last one."""
        structure = NM(n=n, m=4, pad=True)
        spec = LayerSpec("fc", (fan_out, fan_in), "Linear")
        structure.validate(spec)
        budget = structure.budget(spec, structure.fixed_density(spec))
        tail = fan_in % 4
        expected = [n] * (fan_in // 4) + [min(n, tail)]
        gen = torch.Generator().manual_seed(seed)
        empty = torch.zeros(spec.shape, dtype=torch.bool)
        mask = structure.fill(torch.rand(spec.shape, generator=gen), empty, ~empty, budget, spec)
        for _ in range(3):
            assert _padded_group_counts(mask, 4) == [expected] * fan_out
            assert int(mask.sum()) == budget and structure.satisfied(mask, spec, budget)
            keep = structure.keep(torch.rand(spec.shape, generator=gen), mask, 0.5, spec)
            new = structure.fill(
                torch.rand(spec.shape, generator=gen), keep, ~mask, budget, spec, previous=mask
            )
            assert not bool((keep & ~mask).any())  # the drop only removes active weights
            assert not bool((new & ~keep & mask).any())  # nothing dropped is regrown
            mask = new

    def test_training_run_keeps_padded_groups_and_budgets(self):
        """A Linear (fan-in 10) and a Conv2d (fan-in 9) under padded 2:4 train with every check."""

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(1, 6, 3)
                self.fc = nn.Linear(10, 12)
                self.head = nn.Linear(12, 3)

            def forward(self, x):
                h = torch.relu(self.conv(x)).mean(dim=(2, 3))
                return self.head(torch.relu(self.fc(torch.cat([h, h[:, :4]], dim=1))))

        def build():
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return Net()

        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(8, 1, 5, 5, generator=gen), torch.randn(8, 3, generator=gen))] * 3
        config = sparsity_core.preset(
            "rigl",
            density=0.55,
            delta_t=2,
            rules=[LayerRule("head", structures=["unstructured"])],
            structures=[{"kind": "nm", "n": 2, "m": 4, "pad": True}],
        )
        scheduler = check_method_run(
            config,
            build,
            steps=12,
            optimizer_factory=lambda p: torch.optim.Adam(p, 1e-2),
            data=data,
        )
        assert scheduler.history
        assert _padded_group_counts(scheduler.masks["conv"], 4) == [[2, 2, 1]] * 6
        assert _padded_group_counts(scheduler.masks["fc"], 4) == [[2, 2, 2]] * 12

    def test_unpadded_error_names_the_padding_option(self):
        """Without pad=True a fan-in not divisible by M is refused with the opt-in spelled out."""
        with pytest.raises(LayerError, match=r"'pad': True"):
            NM(n=2, m=4).validate(LayerSpec("fc", (3, 10), "Linear"))
