"""DP-SGD training: the shipped guarantees, bad options, private phases, GroupNorm lowering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from he_service.privacy import check_privacy, recompute_epsilon
from models.architectures import BreastCancerMLP, DigitsCNN
from models.cli import main
from models.datasets import load_breast_cancer_split
from models.group_norm import lower_group_norms
from models.privacy import (
    PrivacyBudget,
    PrivacyError,
    PrivatePhase,
    PrivateTraining,
    plan_noise,
    private_network,
)
from models.recipes import DEFAULT_OUT_DIR, RECIPES
from models.training import TrainConfig, deterministic_torch

DP_NAMES = sorted(name for name, r in RECIPES.items() if r.shipped and r.default_privacy)
# The bars: (largest epsilon, smallest held-out accuracy).
BARS = {"breast-cancer-mlp-dp": (1.0, 0.90), "mnist-cnn-dp": (8.0, 0.80)}


def _manifest(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((DEFAULT_OUT_DIR / name / "manifest.json").read_text())
    return manifest


def test_both_dp_models_ship() -> None:
    assert DP_NAMES == sorted(BARS)


@pytest.mark.parametrize("name", DP_NAMES)
def test_opacus_recomputes_the_claimed_epsilon(name: str) -> None:
    section = _manifest(name)["privacy"]
    accountant = RDPAccountant()
    accountant.history = [
        (phase["noise_multiplier"], phase["sample_rate"], phase["steps"])
        for phase in section["phases"]
    ]
    epsilon = accountant.get_epsilon(section["delta"])
    assert epsilon <= section["epsilon"]
    assert epsilon == pytest.approx(section["epsilon_spent"], rel=1e-12)
    # The server's independent accountant agrees, and supports the claim too.
    phases = [(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in section["phases"]]
    independent = recompute_epsilon(phases, section["delta"])
    assert independent == pytest.approx(epsilon, rel=1e-3)
    assert independent <= section["epsilon"]
    check_privacy(section)


@pytest.mark.parametrize("name", DP_NAMES)
def test_dp_models_meet_their_bars(name: str) -> None:
    manifest = _manifest(name)
    section, training = manifest["privacy"], manifest["training"]
    largest, accuracy = BARS[name]
    assert section["epsilon"] <= largest and section["delta"] == 1e-5
    assert training["poly_accuracy"] >= accuracy
    assert training["encrypted_agreement"] >= 0.995
    assert section["n_records"] == training["n_train"]
    assert section["steps"] == sum(p["steps"] for p in section["phases"])
    assert section["noise_seed"] == 0 and "demonstration" in section["noise_seed_note"]
    assert any("held-out split" in item for item in section["outside_guarantee"])


def test_dp_preprocessing_comes_from_the_held_out_split() -> None:
    split = load_breast_cancer_split(0)
    spec = _manifest("breast-cancer-mlp-dp")["input"]["preprocessing"]
    np.testing.assert_array_equal(spec["mean"], split.x_test.mean(axis=0))
    np.testing.assert_array_equal(spec["std"], split.x_test.std(axis=0))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-epsilon", "1", "--dp-delta", "0"], "--dp-delta must be in (0, 1)"),
        (["--dp-epsilon", "1", "--dp-delta", "1"], "--dp-delta must be in (0, 1)"),
        (["--dp-epsilon", "0"], "--dp-epsilon must be a positive number"),
        (["--dp-epsilon", "-2"], "--dp-epsilon must be a positive number"),
        (["--dp-epsilon", "nan"], "--dp-epsilon must be a positive number"),
        (["--dp-epsilon", "1", "--max-grad-norm", "0"], "--max-grad-norm must be positive"),
        (["--dp-delta", "1e-5"], "--dp-delta: only with --dp-epsilon"),
        (["--dp-epsilon", "1e-7"], "no noise multiplier reaches epsilon 1e-07"),
    ],
)
def test_bad_dp_options_fail_before_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "breast-cancer-mlp", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_the_noise_is_planned_for_every_phase_at_once() -> None:
    budget = PrivacyBudget(epsilon=2.0, noise_seed=0)
    one = plan_noise(budget, 1000, 100, [10])
    two = plan_noise(budget, 1000, 100, [10, 10])
    assert two.steps == 2 * one.steps == 200 and two.sample_rate == 0.1
    # Twice the steps within the same budget need more noise per step.
    assert two.noise_multiplier > one.noise_multiplier
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        plan_noise(PrivacyBudget(epsilon=1e-7), 1000, 100, [10])


def test_two_private_phases_compose_in_one_accountant() -> None:
    """The generic path: ReLU training and fine-tuning both private, within one budget."""
    recipe = RECIPES["breast-cancer-mlp"]
    trained = recipe.prepare(0, 0, PrivacyBudget(epsilon=4.0, noise_seed=0))
    section = check_privacy(trained.manifest["privacy"])
    assert [p["name"] for p in section["phases"]] == ["ReLU network", "fine-tuning"]
    assert section["epsilon"] == 4.0 and section["epsilon_spent"] <= 4.0
    phases = [(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in section["phases"]]
    assert recompute_epsilon(phases, 1e-5) > recompute_epsilon(phases[:1], 1e-5)
    split = load_breast_cancer_split(0)
    spec = trained.manifest["input"]["preprocessing"]
    np.testing.assert_array_equal(spec["mean"], split.x_test.mean(axis=0))
    assert trained.manifest["conversion"]["calibration_samples"] == split.n_test
    assert trained.manifest["conversion"]["output_bound"]["samples"] == split.n_test
    assert trained.test_accuracy >= 0.85


def test_opacus_fixes_batch_norm_and_the_lowering_folds_it_back() -> None:
    mlp = private_network(BreastCancerMLP())
    norms = [m for m in mlp.modules() if isinstance(m, nn.GroupNorm)]
    # Over a vector's features each feature alone would be a constant: one group, a layer norm.
    assert [n.num_groups for n in norms] == [1, 1]
    cnn = private_network(DigitsCNN())
    assert [m.num_groups for m in cnn.modules() if isinstance(m, nn.GroupNorm)] == [8, 16]
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in cnn.modules())

    # On one sample the average statistics are that sample's: the lowered network is exact.
    torch.manual_seed(0)
    for m in cnn.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    cnn.eval()
    sample = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = cnn.to(torch.float64)(sample)
        lowered = lower_group_norms(cnn, sample)
        after = lowered(sample)
    assert not any(isinstance(m, nn.GroupNorm) for m in lowered.modules())
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_a_private_phase_refuses_other_records() -> None:
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    session = PrivateTraining(PrivacyBudget(epsilon=8.0, noise_seed=0), x, y, 16, [1])
    trainer = session.trainer(PrivatePhase("fine-tuning", 1, 0.1))
    with deterministic_torch(0), pytest.raises(PrivacyError, match="own records"):
        trainer(nn.Linear(4, 2), x[:32], y[:32], TrainConfig())


def test_sweep_prints_accuracy_per_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "breast-cancer-mlp-dp", "--epsilons", "1,none"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| epsilon | noise multiplier | held-out accuracy")
    shipped = _manifest("breast-cancer-mlp-dp")
    epsilon_one, none = rows[1].split(" | "), rows[2].split(" | ")
    # The recipe's published seed: the epsilon-1 row is the shipped model.
    assert epsilon_one[0] == "| 1" and float(epsilon_one[2]) == pytest.approx(
        shipped["training"]["poly_accuracy"], abs=5e-5
    )
    assert float(epsilon_one[1]) == pytest.approx(shipped["privacy"]["noise_multiplier"], 1e-3)
    assert none[0] == "| none (no DP)" and none[1] == "-"


def test_sweep_refuses_bad_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "breast-cancer-mlp-dp", "--epsilons", "1,lots"]) == 2
    assert "--epsilons takes numbers or 'none'" in capsys.readouterr().err
    assert main(["sweep", "breast-cancer-mlp-dp", "--epsilons", "-1"]) == 2
    assert "--dp-epsilon must be a positive number" in capsys.readouterr().err


def test_a_dp_recipe_prices_its_budget_before_public_pretraining(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the budget was checked")

    monkeypatch.setattr("models.private_recipes.train_loop", no_training)
    argv = ["train", "mnist-cnn-dp", "--out", str(tmp_path), "--dp-epsilon", "1e-7"]
    assert main(argv) == 2
    assert "no noise multiplier reaches epsilon 1e-07" in capsys.readouterr().err
