"""The training benchmark: a tiny grid end to end, resumability, claim checks, models, data."""

from __future__ import annotations

import itertools
import json
import random
import sys
import time

import attrs
import numpy as np
import pytest
import torch

from sparsity_app.bench.grid import Setting, plan_runs, run_grid, run_one, unpack_mask
from sparsity_app.bench.overhead import measure_overhead, overhead_text
from sparsity_app.bench.report import check_claims, group_runs, headline_markdown, results_table
from sparsity_app.bench.store import RunStore
from sparsity_app.cli import main
from sparsity_app.models import build_cnn1d, build_model
from sparsity_app.train import Recipe, train_run
from sparsity_core.errors import CheckpointError, ConfigError, SparsityError

pytest.importorskip("sklearn", reason="the tiny grid trains on scikit-learn's bundled digits")

TINY = Recipe(epochs=1, batch_size=128, hidden=(16,), delta_t=3)
TINY_SETTING = Setting("digits", TINY)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _counting(calls: list[str]):
    def runner(spec):
        calls.append(spec.key)
        return run_one(spec)

    return runner


class TestGrid:
    def test_plan_has_dense_once_per_seed_and_every_method_per_sparsity(self):
        """Dense runs once per (setting, seed); the others once per sparsity and seed."""
        specs = plan_runs(
            [TINY_SETTING], ["dense", "rigl", "srigl"], [0.9, 0.95], [0, 1], mask_sparsity=0.95
        )
        assert len(specs) == 2 + 2 * 2 * 2
        assert len({s.key for s in specs}) == len(specs)
        assert [s.sparsity for s in specs if s.method == "dense"] == [0.0, 0.0]
        kept = [(s.method, s.sparsity, s.seed) for s in specs if s.keep_masks]
        assert kept == [("rigl", 0.95, 0), ("srigl", 0.95, 0)]

    def test_key_changes_with_the_recipe(self):
        """A run with another recipe is another run: it is never taken from the store."""
        a = plan_runs([TINY_SETTING], ["rigl"], [0.9], [0])[0]
        other = attrs.evolve(TINY_SETTING, recipe=attrs.evolve(TINY, delta_t=4))
        b = plan_runs([other], ["rigl"], [0.9], [0])[0]
        assert a.key != b.key and a.key.startswith("digits/mlp/rigl/s0.9/seed0/")

    def test_recipe_overrides_reach_the_method(self):
        """drop_fraction and gamma_sal from the recipe replace the preset's values."""
        from sparsity_app.train import method_config

        recipe = attrs.evolve(TINY, drop_fraction=0.5, gamma_sal=0.7)
        config = method_config("srigl", recipe, 0, 100, "2")
        assert config.drop.alpha == 0.5
        assert config.structures[0].gamma_sal == 0.7 and config.structures[0].exempt == ("2",)
        a = plan_runs([TINY_SETTING], ["srigl"], [0.9], [0])[0]
        b = plan_runs([attrs.evolve(TINY_SETTING, recipe=recipe)], ["srigl"], [0.9], [0])[0]
        assert a.key != b.key
        with pytest.raises(ConfigError, match=r"--gamma-sal=1\.5"):
            Recipe(gamma_sal=1.5)

    def test_bad_sparsity_is_rejected(self):
        """A sparsity given in percent instead of a fraction is a clear error."""
        with pytest.raises(ConfigError, match=r"sparsities \[90\]"):
            plan_runs([TINY_SETTING], ["rigl"], [90], [0])

    def test_tiny_grid_records_accuracy_sparsity_itop_and_masks(self, tmp_path):
        """Every run's record has its accuracy, achieved sparsity, ITOP curve and, when asked,
        masks that decode to the layer's shape with the recorded fan-ins."""
        specs = plan_runs(
            [TINY_SETTING], ["dense", "static", "rigl", "srigl"], [0.9], [0], mask_sparsity=0.9
        )
        store = RunStore(tmp_path / "runs.json")
        assert run_grid(specs, store, stream=sys.stderr) == len(specs)
        runs = {r["method"]: r for r in json.loads((tmp_path / "runs.json").read_text())["runs"]}
        assert set(runs) == {"dense", "static", "rigl", "srigl"}
        assert runs["dense"]["achieved_sparsity"] == 0.0 and runs["dense"]["itop"] is None
        for method in ("static", "rigl", "srigl"):
            run = runs[method]
            assert 0.0 < run["test_accuracy"] <= 1.0
            assert run["achieved_sparsity"] == pytest.approx(0.9, abs=0.01)
            for layer in run["layers"]:
                mask = unpack_mask(run["masks"][layer["fqn"]])
                assert list(mask.shape) == layer["shape"]
                assert mask.reshape(mask.shape[0], -1).sum(axis=1).tolist() == layer["fan_in"]
        assert runs["static"]["itop_curve"] == []
        curve = runs["rigl"]["itop_curve"]
        assert curve and all(b[1] >= a[1] for a, b in itertools.pairwise(curve))
        assert curve[-1][1] == pytest.approx(runs["rigl"]["itop"])
        assert runs["rigl"]["itop"] > 0.1  # regrowth explored weights beyond the first mask


class TestResume:
    def test_completed_runs_are_skipped(self, tmp_path):
        """Re-running the same grid trains nothing; widening it trains only the new runs."""
        path = tmp_path / "runs.json"
        first = plan_runs([TINY_SETTING], ["dense", "rigl"], [0.9], [0])
        calls: list[str] = []
        run_grid(first, RunStore(path), runner=_counting(calls), stream=sys.stderr)
        assert len(calls) == 2
        calls.clear()
        assert run_grid(first, RunStore(path), runner=_counting(calls), stream=sys.stderr) == 0
        assert calls == []
        wider = plan_runs([TINY_SETTING], ["dense", "rigl"], [0.9, 0.95], [0])
        run_grid(wider, RunStore(path), runner=_counting(calls), stream=sys.stderr)
        assert calls == [s.key for s in wider if s.sparsity == 0.95]

    def test_an_interrupted_grid_keeps_its_finished_runs(self, tmp_path):
        """A grid killed after two runs resumes with the third: finished runs are on disk."""
        path = tmp_path / "runs.json"
        specs = plan_runs([TINY_SETTING], ["dense", "static", "set"], [0.9], [0])
        done: list[str] = []

        def dies_on_third(spec):
            if len(done) == 2:
                raise KeyboardInterrupt
            done.append(spec.key)
            return run_one(spec)

        with pytest.raises(KeyboardInterrupt):
            run_grid(specs, RunStore(path), runner=dies_on_third, stream=sys.stderr)
        assert sorted(RunStore(path).runs) == sorted(done)
        calls: list[str] = []
        run_grid(specs, RunStore(path), runner=_counting(calls), stream=sys.stderr)
        assert calls == [specs[2].key]

    def test_a_failing_run_stops_the_pool_and_names_the_run(self, tmp_path):
        """With workers, the first failing run raises at once, naming it; the queued runs are
        cancelled instead of trained for nothing (the pool used to wait for all of them)."""
        specs = plan_runs([TINY_SETTING], ["dense", "static", "set", "rigl"], [0.9], [0, 1, 2])
        start = time.perf_counter()
        with pytest.raises(SparsityError, match=r"run .*/static/.* failed: ValueError: broken"):
            run_grid(specs, RunStore(tmp_path / "r.json"), workers=2, runner=_fails_on_static)
        assert time.perf_counter() - start < 60
        assert len(RunStore(tmp_path / "r.json").runs) < len(specs)

    def test_foreign_file_is_refused(self, tmp_path):
        """A results path holding some other JSON is an error, not silently overwritten."""
        path = tmp_path / "runs.json"
        path.write_text(json.dumps({"runs": []}))
        with pytest.raises(CheckpointError, match="not a train_bench results file"):
            RunStore(path)


def _run(setting, method, sparsity, seed, acc, active=(10, 10)):
    layers = [{"fqn": f"{i}", "active_neurons": a, "fan_out": 10} for i, a in enumerate(active)]
    return {
        "setting": setting,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_accuracy": acc,
        "achieved_sparsity": sparsity,
        "step_ms": 1.0,
        "seconds": 1.0,
        "itop": None,
        "layers": layers,
    }


class TestClaims:
    def _groups(self, static_acc: float, ablation_active: tuple[int, int]):
        runs = [_run("d/m", "dense", 0.0, s, 0.90) for s in (0, 1)]
        for s in (0, 1):
            runs += [
                _run("d/m", "static", 0.9, s, static_acc),
                _run("d/m", "rigl", 0.9, s, 0.895),
                _run("d/m", "srigl", 0.9, s, 0.89, active=(10, 10)),
                _run("d/m", "srigl", 0.95, s, 0.85, active=(ablation_active[0], 10)),
                _run("d/m", "srigl_no_ablation", 0.95, s, 0.80),
                _run("d/m", "srigl", 0.98, s, 0.80, active=(ablation_active[1], 10)),
                _run("d/m", "srigl_no_ablation", 0.98, s, 0.70),
            ]
        return group_runs(runs)

    def test_claims_hold_on_runs_that_show_them(self):
        """DST above static, RigL/SRigL near dense, ablation helping: every verdict holds."""
        verdicts = check_claims(self._groups(static_acc=0.85, ablation_active=(8, 5)))
        assert {v.claim[:2] for v in verdicts} == {"1:", "2:", "3:", "4a", "4b"}
        assert all(v.holds for v in verdicts), [v for v in verdicts if not v.holds]

    def test_claims_fail_on_runs_that_contradict_them(self):
        """A static mask that wins, and active neurons that do not fall, are reported FAILS."""
        verdicts = check_claims(self._groups(static_acc=0.95, ablation_active=(8, 9)))
        failed = {v.claim[:2] for v in verdicts if not v.holds}
        assert failed == {"1:", "4b"}

    def test_tables_show_mean_and_std(self):
        """The text table and the markdown headline give mean ± std over seeds."""
        groups = self._groups(static_acc=0.85, ablation_active=(8, 5))
        assert "85.00 ± 0.00" in results_table(groups)
        md = headline_markdown(groups, "d/m", ["dense", "static", "srigl"], [0.9, 0.95])
        assert "| dense (0%) | 90.00 ± 0.00 | 90.00 ± 0.00 |" in md
        assert "| srigl | 89.00 ± 0.00 | 85.00 ± 0.00 |" in md


class TestModels:
    def test_cnn1d_halves_the_length_per_convolution(self):
        """The 1-D CNN maps [batch, 40] to class logits through three stride-2 convolutions."""
        model = build_cnn1d(40, (4, 8, 8), 10)
        assert model(torch.zeros(3, 40)).shape == (3, 10)
        assert model[-1].in_features == 8 * 5

    def test_unknown_model_is_rejected(self):
        """A misspelled model name lists the known ones."""
        with pytest.raises(ConfigError, match="choose one of"):
            build_model("cnn", 40, 10, (8,))
        with pytest.raises(ConfigError, match="--model='cnn'"):
            Recipe(model="cnn")

    @pytest.mark.parametrize("method", ["srigl", "nm_rigl"])
    def test_structured_methods_train_the_cnn(self, method):
        """SRigL and N:M train Conv1d layers; N:M pads fan-ins its M does not divide (1x5)."""
        from sparsity_app.data import load_dataset

        recipe = Recipe(epochs=1, batch_size=128, hidden=(4, 8), delta_t=3, model="cnn1d")
        result = train_run(method, load_dataset("digits"), recipe)
        assert all(layer["satisfied"] for layer in result.layers)
        assert result.layers[0]["shape"] == [4, 1, 5]
        if method == "nm_rigl":
            assert "padded" in result.layers[0]["structure"]


class TestOverhead:
    def test_tiny_overhead_run_reports_ratios(self):
        """The overhead timing returns medians per setup and an amortised update cost."""
        result = measure_overhead(
            widths=(16, 32, 8),
            methods=("rigl",),
            delta_t=5,
            rounds=1,
            steps_per_round=1,
            updates=1,
            threads=1,
        )
        (rigl,) = result["methods"]
        assert rigl["step_ratio"] == pytest.approx(rigl["step_ms"] / result["dense_step_ms"])
        assert rigl["amortised"] == pytest.approx(rigl["update_extra_ms"] / (5 * rigl["step_ms"]))
        assert "rigl (dense-masked)" in overhead_text(result)


class TestCommand:
    def test_bench_train_writes_table_json_and_skips_done_runs(self, tmp_path, capsys):
        """`sparsity-core bench train` writes the table and JSON; a re-run trains nothing."""
        argv = [
            "bench", "train", "--settings", "digits/mlp", "--methods", "dense", "rigl", "srigl",
            "--sparsities", "90", "--seeds", "1", "--set", "epochs=1", "--set", "hidden=16",
            "--set", "delta_t=3", "--out-dir", str(tmp_path), "--no-overhead", "--no-plots",
        ]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr()
        assert "test acc % (mean ± std)" in out.out and "claim" in out.out
        runs = json.loads((tmp_path / "train_bench.json").read_text())["runs"]
        assert sorted(r["method"] for r in runs) == ["dense", "rigl", "srigl"]
        assert (tmp_path / "train_bench.txt").read_text().startswith("train_bench:")
        assert main(argv) == 0
        assert "3 of 3 runs already done, skipped" in capsys.readouterr().err

    def test_bad_override_is_a_clear_error(self, tmp_path, capsys):
        """--set with an unknown field exits with code 2 and lists the fields."""
        argv = ["bench", "train", "--set", "epoch=3", "--out-dir", str(tmp_path)]
        assert main(argv) == 2
        assert "FIELD one of" in capsys.readouterr().err

    def test_plots_are_written(self, tmp_path):
        """With matplotlib installed, the four PNG figures are written."""
        pytest.importorskip("matplotlib", reason="plots need matplotlib")
        argv = [
            "bench", "train", "--settings", "digits/mlp", "--methods", "dense", "static", "srigl",
            "--sparsities", "90", "95", "--seeds", "1", "--set", "epochs=1", "--set", "hidden=16",
            "--set", "delta_t=3", "--out-dir", str(tmp_path), "--no-overhead",
        ]  # fmt: skip
        assert main(argv) == 0
        for name in ("accuracy", "active_neurons", "itop", "masks"):
            png = tmp_path / f"train_bench_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TestMnist1d:
    def test_standard_split_is_generated_once_and_cached(self, tmp_path, monkeypatch):
        """MNIST-1D is generated locally (4000/1000), cached, and leaves global RNGs alone."""
        pytest.importorskip("mnist1d", reason="generating MNIST-1D needs the mnist1d package")
        from sparsity_app.data import load_dataset

        monkeypatch.setenv("SPARSITY_CORE_CACHE", str(tmp_path))
        np.random.seed(123)
        random.seed(123)
        data = load_dataset("mnist1d")
        assert (len(data.y_train), len(data.y_test), data.num_features) == (4000, 1000, 40)
        assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)
        assert random.random() == random.Random(123).random()
        (cached,) = tmp_path.glob("mnist1d-n5000-seed42.npz")
        again = load_dataset("mnist1d")
        assert torch.equal(again.x_train, data.x_train) and cached.exists()


def _fails_on_static(spec):
    """A grid runner (module level, so worker processes can import it) that fails on static."""
    if spec.method == "static":
        raise ValueError("broken")
    time.sleep(0.5)
    # The fields run_grid prints for a finished run (a run may finish before the failure).
    return {
        "key": spec.key,
        "test_accuracy": 0.5,
        "setting": spec.setting,
        "seconds": 0.5,
        "step_ms": 1.0,
    }
