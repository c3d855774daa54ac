"""The ``he-models`` command line (``train`` is covered by the artifact tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from he_service.artifacts import load_artifact
from he_service.engine import compile_model, compile_plan
from models.cli import main
from models.recipes import RECIPES

NET_SOURCE = """
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(27, 3),
    )


class NotAModule:
    pass
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a model module, its weights and raw calibration images."""
    name = f"cli_net_{abs(hash(str(tmp_path))) % 10**8}"  # a fresh module name per test
    (tmp_path / f"{name}.py").write_text(NET_SOURCE)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)
    )
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    raw = np.random.default_rng(0).integers(0, 256, size=(40, 1, 7, 7)).astype(np.float64)
    np.save(tmp_path / "calibration.npy", raw)
    (tmp_path / "module_name").write_text(name)
    return tmp_path


def _convert_args(workdir: Path, *extra: str) -> list[str]:
    module = (workdir / "module_name").read_text()
    return [
        "convert",
        f"{module}:make",
        "--weights",
        "weights.pt",
        "--calibration",
        "calibration.npy",
        "--out",
        str(workdir / "out"),
        *extra,
    ]


def test_convert_writes_an_artifact_and_prints_the_report(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _convert_args(workdir, "--name", "tiny-net", "--degree", "2", "--scale", "0.00392")
    argv += ["--mean", "0.5", "--std", "0.25", "--labels", "a,b,c"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1: BatchNorm2d(" in out and "folded into 0" in out
    assert "2: ReLU() -> poly degree 2 on [" in out
    assert "multiplicative depth 1" in out
    assert "wrote " in out
    artifact = load_artifact(workdir / "out" / "tiny-net")
    assert artifact.labels == ("a", "b", "c")
    assert artifact.preprocessing == {"scale": 0.00392, "mean": [0.5], "std": [0.25]}
    assert compile_plan(artifact).params_reason["depth"] == 1
    manifest = json.loads((workdir / "out" / "tiny-net" / "manifest.json").read_text())
    assert manifest["conversion"]["activations"][0]["degree"] == 2
    assert manifest["conversion"]["output_bound"]["samples"] == 40
    assert len(manifest["provenance"]["weights_sha256"]) == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--name", "Bad Name"], "must match"),
        (["--name", "x", "--input-shape", "1", "8", "8"], "does not match"),
        (["--name", "x", "--mean", "1", "2"], "--mean takes 1 value, got 2"),
        (["--name", "x", "--std", "0"], "must not contain 0"),
        (["--name", "x", "--labels", "a,b"], "names 2 outputs, the network has 3"),
        (["--name", "x", "--degree", "12"], "degree must be 1..4 (the engine evaluates"),
        (["--name", "x", "--degree", "5"], "degree must be 1..4 (the engine evaluates"),
    ],
)
def test_convert_input_errors_exit_2(
    workdir: Path, change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_convert_args(workdir, *change)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (workdir / "out").exists() or list((workdir / "out").iterdir()) == []


def test_convert_file_errors_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = (workdir / "module_name").read_text()
    base = ["--calibration", "calibration.npy", "--name", "x", "--out", "out"]
    cases = [
        (["convert", "no_such_module_xyz:make", "--weights", "weights.pt", *base], "cannot import"),
        (["convert", f"{module}", "--weights", "weights.pt", *base], "MODULE:FACTORY"),
        (["convert", f"{module}:missing", "--weights", "weights.pt", *base], "no attribute"),
        (["convert", f"{module}:NotAModule", "--weights", "weights.pt", *base], "not a torch"),
        (["convert", f"{module}:make", "--weights", "none.pt", *base], "does not exist"),
    ]
    # A pickled object that is not a state dict: weights_only loading refuses it.
    torch.save({"model": nn.Linear(2, 2)}, workdir / "pickled.pt")
    cases.append(
        (["convert", f"{module}:make", "--weights", "pickled.pt", *base], "weights_only=True")
    )
    torch.save({"other.weight": torch.zeros(2)}, workdir / "wrong.pt")
    cases.append((["convert", f"{module}:make", "--weights", "wrong.pt", *base], "do not fit"))
    np.save(workdir / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases.append(
        (
            ["convert", f"{module}:make", "--weights", "weights.pt", "--calibration",
             "objects.npy", "--name", "x"],
            "cannot read",
        )
    )  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "Traceback" not in err
    assert not (workdir / "out").exists()


def test_unknown_model_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "no-such-model"]) == 2
    captured = capsys.readouterr()
    assert "unknown model 'no-such-model'" in captured.err
    assert "mnist-cnn" in captured.err
    assert "Traceback" not in captured.err


def test_convert_fine_tunes_privately_on_user_data(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    np.save(workdir / "x.npy", rng.integers(0, 256, size=(200, 1, 7, 7)).astype(np.float64))
    np.save(workdir / "y.npy", rng.integers(0, 3, size=200))
    tuning = ["--fine-tune-data", "x.npy", "--fine-tune-targets", "y.npy"]
    argv = _convert_args(workdir, "--name", "tiny-dp", "--degree", "2", *tuning)
    assert main([*argv, "--dp-epsilon", "2", "--dp-noise-seed", "3"]) == 0
    assert "with DP-SGD (epsilon 2)" in capsys.readouterr().out
    manifest = json.loads((workdir / "out" / "tiny-dp" / "manifest.json").read_text())
    privacy = manifest["privacy"]
    assert privacy["epsilon"] == 2.0 and privacy["n_records"] == 200
    assert privacy["phases"][0]["name"] == "fine-tuning" and privacy["noise_seed"] == 3
    assert "x.npy (sha256 " in privacy["dataset"]
    assert "--calibration" in privacy["outside_guarantee"][0]
    assert manifest["training"]["fine_tune_samples"] == 200
    # Without a noise seed the seed is secret: not recorded.
    assert main([*argv, "--dp-epsilon", "2"]) == 0
    manifest = json.loads((workdir / "out" / "tiny-dp" / "manifest.json").read_text())
    assert manifest["privacy"]["noise_seed"] is None
    assert "not recorded" in manifest["privacy"]["noise_seed_note"]
    # Ordinary fine-tuning writes no privacy section.
    assert main(_convert_args(workdir, "--name", "tiny-ft", "--degree", "2", *tuning)) == 0
    plain = json.loads((workdir / "out" / "tiny-ft" / "manifest.json").read_text())
    assert "privacy" not in plain and plain["training"]["fine_tuning"]["epochs"] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dp-epsilon", "1"], "--dp-epsilon applies to fine-tuning"),
        (["--fine-tune-data", "x.npy"], "go together"),
        (
            ["--fine-tune-data", "x.npy", "--fine-tune-targets", "y.npy", "--dp-epsilon", "1e-7"],
            "no noise multiplier",
        ),
        (
            ["--fine-tune-data", "x.npy", "--fine-tune-targets", "y.npy", "--dp-delta", "2"],
            "only with --dp-epsilon",
        ),
    ],
)
def test_convert_refuses_bad_fine_tuning_options(
    workdir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(workdir / "x.npy", np.zeros((10, 1, 7, 7)))
    np.save(workdir / "y.npy", np.zeros(10, dtype=np.int64))
    assert main(_convert_args(workdir, "--name", "tiny-bad", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "out" / "tiny-bad").exists()


def test_evaluate_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "no-such-model"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["evaluate", "mnist-cnn", "--data", "x.npy"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["evaluate", "mnist-cnn", "--samples", "-1"]) == 2
    assert ">= 0" in capsys.readouterr().err


def test_evaluate_prints_the_four_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "breast-cancer-mlp", "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "plaintext accuracy (original network): 0.9" in out
    assert "polynomial accuracy: 0.9" in out and "original minus polynomial" in out
    assert "encrypted accuracy: " in out and "on 4 samples (seed 0)" in out
    assert "encrypted/polynomial agreement: 1.0000" in out
    assert "outside the calibrated ranges" in out
    assert (
        "outputs outside the calibrated output ranges (flagged unreliable by the SDK): "
        "polynomial 0.000% of 114 samples, encrypted 0.000% of 4"
    ) in out
    assert "privacy: This model was trained without differential privacy" in out


def test_evaluate_prints_the_dp_guarantee(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "breast-cancer-mlp-dp", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "privacy: (1, 1e-05)-differentially private with respect to one training record" in out
    assert "455 training records" in out and "noise multiplier" in out
    assert "outside the guarantee: " in out and "held-out split" in out
    assert "noise seed: 0, published" in out


def test_evaluate_reports_how_often_held_out_inputs_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    # Half the samples scaled far outside the data: their outputs leave the calibrated ranges.
    x = np.concatenate([data.data[:6], 100 * data.data[6:12]])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", data.target[:12])
    argv = ["evaluate", "breast-cancer-mlp", "--samples", "12"]
    assert (
        main([*argv, "--data", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy")]) == 0
    )
    out = capsys.readouterr().out
    assert "polynomial 50.000% of 12 samples, encrypted 50.000% of 12" in out


def test_evaluate_a_converted_model_with_its_own_data(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_convert_args(workdir, "--name", "tiny-net", "--degree", "2")) == 0
    capsys.readouterr()
    assert main(["evaluate", "tiny-net", "--models-dir", str(workdir / "out")]) == 2
    assert "--data" in capsys.readouterr().err
    np.save(workdir / "y.npy", np.zeros(40, dtype=np.int64))
    argv = ["evaluate", "tiny-net", "--models-dir", str(workdir / "out"), "--samples", "3"]
    assert main([*argv, "--data", "calibration.npy", "--targets", "y.npy"]) == 0
    out = capsys.readouterr().out
    assert "n/a (not recorded)" in out
    assert "on 3 samples" in out


def test_list_names_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "breast-cancer-mlp",
        "breast-cancer-mlp-dp",
        "digits-cnn",
        "digits-resnet",
        "mnist-cnn",
        "mnist-cnn-dp",
        "mnist-lenet5",
    ]
    shipped = {line.split()[0]: "not shipped" not in line for line in lines}
    assert shipped == {name: recipe.shipped for name, recipe in RECIPES.items()}


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: he-models" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    assert "--seed" in capsys.readouterr().out
    assert main(["convert", "--help"]) == 0
    assert "--max-degree" in capsys.readouterr().out


def test_convert_standardize_uses_the_calibration_statistics(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _convert_args(workdir, "--name", "std-net", "--degree", "2", "--scale", "0.5")
    assert main([*argv, "--standardize"]) == 0
    capsys.readouterr()
    raw = np.load(workdir / "calibration.npy") * 0.5
    preprocessing = load_artifact(workdir / "out" / "std-net").preprocessing
    assert preprocessing == {"scale": 0.5, "mean": [raw.mean()], "std": [raw.std()]}
    assert main([*argv, "--standardize", "--mean", "1"]) == 2
    assert "either --standardize or --mean/--std" in capsys.readouterr().err


def test_convert_key_budget_is_recorded_and_enforced(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _convert_args(workdir, "--name", "budget-net", "--degree", "2")
    assert main([*argv, "--key-budget", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "could not export budget-net" in err and "key budget" in err
    assert "--key-budget" in err
    assert list((workdir / "out").iterdir()) == []  # nothing written, no staging left
    assert main([*argv, "--key-budget", "512"]) == 0
    out = capsys.readouterr().out
    compiled = compile_model(load_artifact(workdir / "out" / "budget-net"))
    assert compiled.key_budget_bytes == 512 << 20
    manifest = json.loads((workdir / "out" / "budget-net" / "manifest.json").read_text())
    assert manifest["serving"] == {"key_budget_bytes": 512 << 20}
    latency = compiled.latency
    bits = list(latency.params.coeff_modulus_bits)
    summary = latency.summary()
    assert (
        f"latency plan: N={latency.params.poly_modulus_degree}, primes {bits[:-1]} + "
        f"{bits[-1]}-bit special, depth {summary['depth']}; public keys "
    ) in out
    assert f"({summary['public_key_bytes']} bytes, {summary['galois_keys']} Galois keys)" in out
    assert f"{summary['rotations']} rotations; request " in out
    assert "batch plan: N=" in out and "per group of " in out
    assert "key budget 512.0 MiB (536870912 bytes) per plan" in out
    assert main([*argv, "--key-budget", "0"]) == 2
    assert "--key-budget must be positive" in capsys.readouterr().err


DEEP_SOURCE = """
from torch import nn


def make():
    layers = []
    for _ in range(11):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(4, 2))
"""


def test_convert_refuses_a_network_too_deep_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "deep_net.py").write_text(DEEP_SOURCE)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(11):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    torch.save(nn.Sequential(*layers, nn.Linear(4, 2)).state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 4)))
    argv = ["convert", "deep_net:make", "--weights", "w.pt", "--calibration", "x.npy"]
    code = main([*argv, "--name", "deep", "--degree", "4", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1
    assert "multiplicative depth 22 " in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith("he-models: error: could not export deep: the engine cannot ")
    assert line.endswith(
        "(the converted network has 11 fitted activations (11 of degree 4), depth 22 on its "
        "longest path; --degree 2 costs one level per activation instead of two)"
    )
    assert list((tmp_path / "out").iterdir()) == []
