"""The command line: plugin listing and the main training job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from sparsity_app.cli import main
from sparsity_app.data import load_dataset
from sparsity_app.train import Recipe, train_run
from sparsity_core.errors import CheckpointError

pytest.importorskip("sklearn", reason="the main job's digits dataset ships with scikit-learn")

TINY = ["--epochs", "2", "--hidden", "32", "--delta-t", "5", "--threads", "1"]


class TestPluginsCommand:
    def test_lists_every_builtin_plugin_with_its_components(self, capsys):
        """The text listing names each built-in plugin, its distribution and its components."""
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "growth_criteria  (sparsity-core" in out
        for name in ("gradient", "momentum", "unfired", "erk", "cosine", "dense_masked", "rigl"):
            assert f" {name} " in out

    def test_json_listing_is_machine_readable(self, capsys):
        """--json gives one object per plugin with version and components by type."""
        assert main(["plugins", "--json"]) == 0
        plugins = {p["plugin"]: p for p in json.loads(capsys.readouterr().out)}
        assert plugins["growth_criteria"]["distribution"] == "sparsity-core"
        assert plugins["growth_criteria"]["version"]
        assert sorted(plugins["growth_criteria"]["components"]["growth"]) == [
            "gradient",
            "momentum",
            "random",
            "unfired",
        ]
        assert plugins["presets"]["components"]["preset"] == [
            "nm_rigl",
            "nm_set",
            "rigl",
            "set",
            "srigl",
            "srigl_no_ablation",
            "static",
        ]

    def test_python_dash_m_runs_the_same_command(self):
        """`python -m sparsity_app plugins` works like the console script."""
        proc = subprocess.run(
            [sys.executable, "-m", "sparsity_app", "plugins", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert any(p["plugin"] == "presets" for p in json.loads(proc.stdout))

    def test_the_old_python_dash_m_sparsity_core_still_works_and_says_where_it_moved(self):
        """The deprecated alias runs the same command and warns, naming the new one."""
        proc = subprocess.run(
            [sys.executable, "-W", "default", "-m", "sparsity_core", "plugins", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert any(p["plugin"] == "presets" for p in json.loads(proc.stdout))
        assert "DeprecationWarning" in proc.stderr and "python -m sparsity_app" in proc.stderr


class TestTrainCommand:
    def test_tiny_run_prints_the_comparison_table(self, capsys, tmp_path):
        """A short run trains dense and RigL and prints accuracy, sparsity and ITOP per layer."""
        out_json = tmp_path / "runs.json"
        assert main(["train", *TINY, "--json", str(out_json)]) == 0
        out = capsys.readouterr().out
        assert "test acc %" in out and "ITOP" in out
        runs = json.loads(out_json.read_text())["runs"]
        assert [r["method"] for r in runs] == ["dense", "rigl"]
        rigl = runs[1]
        assert rigl["density"] == pytest.approx(0.1, abs=0.01)
        assert 0.0 < rigl["test_accuracy"] <= 1.0
        assert all(0.0 < layer["sparsity"] < 1.0 for layer in rigl["layers"])

    def test_compact_trains_each_method_masked_and_compact_side_by_side(self, capsys, tmp_path):
        """--compact adds a compact run of each method: the same accuracy and masks as the
        masked run, and step time and training-state memory for all three in the table."""
        out_json = tmp_path / "runs.json"
        assert main(["train", *TINY, "--compact", "--json", str(out_json)]) == 0
        out = capsys.readouterr().out
        assert "rigl (compact)" in out and "step ms" in out and "state KiB" in out
        runs = json.loads(out_json.read_text())["runs"]
        assert [(r["method"], r["compact"]) for r in runs] == [
            ("dense", False),
            ("rigl", False),
            ("rigl", True),
        ]
        masked, compact = runs[1], runs[2]
        assert compact["test_accuracy"] == pytest.approx(masked["test_accuracy"], abs=0.02)
        assert compact["state_bytes"] < 0.5 * runs[0]["state_bytes"] < masked["state_bytes"]
        assert all(r["step_ms"] > 0 for r in runs)

    def test_structured_methods_report_fan_in_and_validity(self, capsys, tmp_path):
        """SRigL and nm_rigl runs report constant fan-in, active neurons and a holding structure."""
        out_json = tmp_path / "runs.json"
        argv = [
            "train",
            *TINY,
            "--hidden",
            "64",
            "--method",
            "srigl",
            "--method",
            "nm_rigl",
            "--no-dense",
            "--json",
            str(out_json),
        ]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "neuron_ablation + constant_fan_in" in out and "nm 3:32" in out
        runs = {r["method"]: r for r in json.loads(out_json.read_text())["runs"]}
        for run in runs.values():
            assert all(layer["satisfied"] for layer in run["layers"])
            hidden = run["layers"][0]
            assert hidden["fan_in_min"] == hidden["fan_in_max"] > 0
        assert runs["nm_rigl"]["density"] == pytest.approx(3 / 32)
        head = runs["srigl"]["layers"][-1]
        assert head["active_neurons"] == head["fan_out"]  # the output layer is never ablated

    def test_cnn1d_model_trains_conv_layers(self, capsys, tmp_path):
        """--model cnn1d trains the 1-D CNN (--hidden gives channels) with sparse Conv1d layers."""
        out_json = tmp_path / "runs.json"
        argv = ["train", *TINY, "--model", "cnn1d", "--hidden", "4,8", "--no-dense"]
        assert main([*argv, "--json", str(out_json)]) == 0
        assert "CNN1D 64-4-8-10" in capsys.readouterr().err
        (run,) = json.loads(out_json.read_text())["runs"]
        assert [layer["shape"] for layer in run["layers"]] == [[4, 1, 5], [8, 4, 3], [10, 128]]
        assert json.loads(out_json.read_text())["recipe"]["model"] == "cnn1d"

    def test_unknown_method_fails_before_training(self, capsys):
        """A misspelled method exits with code 2 and lists the presets, without training."""
        assert main(["train", *TINY, "--method", "rigll"]) == 2
        err = capsys.readouterr().err
        assert "unknown preset 'rigll'" in err and "rigl (from presets)" in err
        assert "train [" not in err

    def test_bad_sparsity_is_rejected(self, capsys):
        """--sparsity outside [0, 1) is a clear error."""
        assert main(["train", *TINY, "--sparsity", "1.2"]) == 2
        assert "--sparsity=1.2" in capsys.readouterr().err


class TestExportCommand:
    def test_exports_a_trained_srigl_checkpoint_and_reports_bytes(self, tmp_path, capsys):
        """`export CHECKPOINT --format condensed` prints bytes per layer and writes a file."""
        argv = [
            "train",
            *TINY,
            "--method",
            "srigl",
            "--no-dense",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "10",
        ]
        assert main(argv) == 0
        ckpt = tmp_path / "srigl-seed0.pt"
        capsys.readouterr()
        assert main(["export", str(ckpt), "--format", "condensed"]) == 0
        out = capsys.readouterr().out
        assert "condensed" in out and "total" in out and "saved B" in out
        exported = torch.load(tmp_path / "srigl-seed0.condensed.pt", weights_only=True)
        assert exported["format"] == "condensed"
        assert any(key.endswith("values") for key in exported["model"])
        # A rule of none keeps a layer dense: reported as skipped, its weight saved as is.
        out_file = tmp_path / "kept.pt"
        argv = ["export", str(ckpt), "--rule", "0=none", "--out", str(out_file)]
        assert main(argv) == 0
        assert "skipped 0 (Linear): its format is None" in capsys.readouterr().out
        kept = torch.load(out_file, weights_only=True)
        assert kept["rules"] == ["0=none"] and "0.weight" in kept["model"]
        assert "0.values" not in kept["model"] and "2.values" in kept["model"]

    def test_a_compact_checkpoint_exports_like_the_masked_one(self, capsys, tmp_path):
        """sparsity-core export takes a --compact run's checkpoint (its layout is rebuilt from
        the saved masks) and writes the masked run's packed model."""
        argv = [
            "train",
            *TINY,
            "--method",
            "srigl",
            "--no-dense",
            "--compact",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "10",
        ]
        assert main(argv) == 0
        for name in ("srigl-seed0", "srigl-compact-seed0"):
            assert main(["export", str(tmp_path / f"{name}.pt"), "--format", "condensed"]) == 0
        capsys.readouterr()
        masked = torch.load(tmp_path / "srigl-seed0.condensed.pt", weights_only=True)["model"]
        compact = torch.load(tmp_path / "srigl-compact-seed0.condensed.pt", weights_only=True)
        assert masked.keys() == compact["model"].keys()
        for key, value in masked.items():
            torch.testing.assert_close(compact["model"][key], value, msg=key)

    def test_format_parameters_parse_ints_and_booleans(self):
        """`nm:n=2,m=4,semi_structured=true` gives ints and a bool; other values stay text."""
        from sparsity_app.cli import _format_arg

        assert _format_arg("nm:n=2,m=4,semi_structured=true") == {
            "kind": "nm",
            "n": 2,
            "m": 4,
            "semi_structured": True,
        }
        assert _format_arg("csr") == "csr"
        assert _format_arg("x:mode=False,name=abc")["mode"] is False

    def test_dense_checkpoint_is_refused(self, tmp_path, capsys):
        """The dense baseline's checkpoint has no masks: a clear error, exit code 2."""
        argv = [
            "train",
            *TINY,
            "--method",
            "rigl",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "10",
        ]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["export", str(tmp_path / "dense-seed0.pt")]) == 2
        assert "no masks to export" in capsys.readouterr().err

    def test_unsupported_format_names_the_layer(self, tmp_path, capsys):
        """condensed on an unstructured RigL checkpoint fails before writing anything."""
        argv = [
            "train",
            *TINY,
            "--method",
            "rigl",
            "--no-dense",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "10",
        ]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["export", str(tmp_path / "rigl-seed0.pt"), "--format", "condensed"]) == 2
        assert "condensed" in capsys.readouterr().err
        assert not (tmp_path / "rigl-seed0.condensed.pt").exists()


class _Crash(Exception):
    pass


class _CrashAt:
    """A progress bar that raises after ``step`` training steps (a crash mid-run)."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        self.seen += n if postfix is None else 1
        if postfix is not None and self.seen >= self.step:
            raise _Crash


RECIPE = Recipe(epochs=3, hidden=(32,), delta_t=7)  # digits: 23 steps per epoch, 69 in all


class TestCheckpointResume:
    """The main job's checkpoints: the last step is saved, and a resume continues that run."""

    def _crashed(self, tmp_path, at: int = 45, compact: bool = False):
        data = load_dataset("digits")
        ckpt = tmp_path / "rigl.pt"
        with pytest.raises(_Crash):
            train_run(
                "rigl",
                data,
                RECIPE,
                seed=3,
                checkpoint=ckpt,
                checkpoint_every=30,
                progress=_CrashAt(at),
                compact=compact,
            )
        return data, ckpt

    def test_resumed_run_ends_identically(self, tmp_path):
        """Resuming from a mid-run checkpoint ends with the uninterrupted run's exact results."""
        torch.set_num_threads(1)
        data, ckpt = self._crashed(tmp_path)
        assert torch.load(ckpt, weights_only=True)["step"] == 30
        full = train_run("rigl", data, RECIPE, seed=3)
        resumed = train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, resume=True)
        assert (resumed.steps, resumed.resumed_from, full.steps) == (69, 30, 69)
        assert resumed.test_accuracy == full.test_accuracy
        assert resumed.train_loss == full.train_loss
        assert resumed.layers == full.layers

    def test_a_compact_run_resumes_identically(self, tmp_path):
        """A compact run crashed at step 45 resumes from its step-30 checkpoint (the layout is
        rebuilt from the saved masks) and ends as the uninterrupted compact run."""
        torch.set_num_threads(1)
        data, ckpt = self._crashed(tmp_path, compact=True)
        full = train_run("rigl", data, RECIPE, seed=3, compact=True)
        resumed = train_run(
            "rigl", data, RECIPE, seed=3, checkpoint=ckpt, resume=True, compact=True
        )
        assert (resumed.steps, resumed.resumed_from) == (69, 30)
        assert resumed.test_accuracy == full.test_accuracy
        assert resumed.train_loss == full.train_loss
        assert resumed.layers == full.layers
        with pytest.raises(CheckpointError, match="resume it with --compact"):
            train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, resume=True)

    def test_the_last_step_is_always_saved(self, tmp_path):
        """--checkpoint-every 30 on a 69-step run saves steps 30, 60 and 69 (the end)."""
        data = load_dataset("digits")
        ckpt = tmp_path / "rigl.pt"
        full = train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, checkpoint_every=30)
        saved = torch.load(ckpt, weights_only=True)
        assert saved["step"] == full.steps == 69
        assert saved["train_loss"] == full.train_loss

    def test_resuming_a_finished_run_reports_its_results(self, tmp_path):
        """No step left to train: the loss and step count come from the checkpoint, not NaN."""
        data = load_dataset("digits")
        ckpt = tmp_path / "rigl.pt"
        full = train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, checkpoint_every=30)
        again = train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, resume=True)
        assert (again.steps, again.resumed_from) == (69, 69)
        assert again.train_loss == full.train_loss
        assert again.test_accuracy == full.test_accuracy

    @pytest.mark.parametrize(
        ("flag", "change", "shown"),
        [
            ("--sparsity", {"sparsity": 0.8}, "--sparsity 0.9 in the checkpoint, 0.8 now"),
            ("--epochs", {"epochs": 4}, "--epochs 3 in the checkpoint, 4 now"),
            ("--hidden", {"hidden": (64,)}, "--hidden 32 in the checkpoint, 64 now"),
        ],
    )
    def test_changed_flags_are_refused_on_resume(self, tmp_path, flag, change, shown):
        """A resume with another --sparsity or --epochs names the flag and both values."""
        data, ckpt = self._crashed(tmp_path)
        recipe = attrs.evolve(RECIPE, **change)
        with pytest.raises(CheckpointError) as info:
            train_run("rigl", data, recipe, seed=3, checkpoint=ckpt, resume=True)
        assert shown in str(info.value) and flag in str(info.value)

    def test_a_newer_checkpoint_version_is_refused(self, tmp_path):
        """A file from a newer sparsity-core is not resumed as if it were ours."""
        data, ckpt = self._crashed(tmp_path)
        state = torch.load(ckpt, weights_only=True)
        assert state["version"] == 1
        torch.save({**state, "version": 2}, ckpt)
        with pytest.raises(CheckpointError, match="version 2, newer"):
            train_run("rigl", data, RECIPE, seed=3, checkpoint=ckpt, resume=True)

    def test_cli_resume_with_another_sparsity_exits_2(self, tmp_path, capsys):
        """The CLI reports the mismatch as an error, before any training."""
        args = ["train", "--method", "rigl", "--no-dense", "--checkpoint-dir", str(tmp_path)]
        args += ["--checkpoint-every", "50", *TINY]
        threads = torch.get_num_threads()
        try:
            assert main(args) == 0
            capsys.readouterr()
            assert main([*args, "--resume", "--sparsity", "0.8"]) == 2
        finally:
            torch.set_num_threads(threads)
        err = capsys.readouterr().err
        assert "--sparsity 0.9 in the checkpoint, 0.8 now" in err


class TestExportCheckpointErrors:
    """`sparsity-core export` on a damaged file: our message, naming the file, never torch's."""

    def _checkpoint(self, tmp_path) -> Path:
        args = ["train", "--method", "srigl", "--no-dense", "--checkpoint-dir", str(tmp_path)]
        threads = torch.get_num_threads()
        try:
            assert main([*args, "--checkpoint-every", "5", *TINY]) == 0
        finally:
            torch.set_num_threads(threads)
        return tmp_path / "srigl-seed0.pt"

    def test_truncated_file(self, tmp_path, capsys):
        path = self._checkpoint(tmp_path)
        data = path.read_bytes()
        for cut in (len(data) // 2, 100, 0):
            path.write_bytes(data[:cut])
            capsys.readouterr()
            assert main(["export", str(path)]) == 2
            err = capsys.readouterr().err
            assert "srigl-seed0.pt" in err and "truncated or corrupt" in err
            reason = err.split("cannot be read (")[1].split(")")[0]
            assert reason.strip(), err

    def test_tampered_file(self, tmp_path, capsys):
        """A file that asks to unpickle code is refused without torch's 'weights_only=False' tip."""
        path = tmp_path / "evil.pt"
        torch.save({"arch": print, "model": {}}, path)
        capsys.readouterr()
        assert main(["export", str(path)]) == 2
        err = capsys.readouterr().err
        assert "evil.pt" in err and "refuses to unpickle" in err
        assert "will likely succeed" not in err
