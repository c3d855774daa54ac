"""``he-models audit``: membership attacks against real recipe-trained artifacts, and its CLI."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from he_service.artifacts import load_artifact
from models.audit import MARKDOWN_HEADER, AuditTarget, audit, load_target
from models.cli import main
from models.datasets import Split
from models.export import export_artifact
from models.recipes import DEFAULT_OUT_DIR, RECIPES


def test_attacks_find_a_network_that_memorises_random_labels() -> None:
    # digits-cnn trained by its recipe on 100 images with random labels can only memorise
    # them: members get low losses, non-members chance-level ones.
    recipe = RECIPES["digits-cnn"]
    full = recipe.load_split(0)
    x = full.x_train[:200]
    y = np.random.default_rng(0).integers(10, size=200)
    split = Split(x[:100], y[:100], x[100:], y[100:])
    trained = recipe.prepare_split(split, 0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_artifact(tmp, "digits-cnn", trained.arrays, trained.manifest)
        artifact = load_artifact(exported.path)
    result = audit(AuditTarget("digits-cnn", artifact, recipe, split, 0), shadows=4)
    assert result.held_out_accuracy < 0.25
    assert result.loss.auc > 0.75
    assert result.lira.auc > 0.75
    # LiRA's strength: it identifies members confidently where the loss threshold cannot.
    assert result.lira.tpr_at_low_fpr > 0.1
    assert result.lira.tpr_at_low_fpr > result.loss.tpr_at_low_fpr


def test_attacks_find_nothing_when_no_sample_trained_the_target() -> None:
    # The shipped digits-cnn never saw its held-out images; split them into "members" and
    # "non-members" and the attacks have nothing to find.
    target = load_target("digits-cnn")
    held_out = target.split
    split = Split(
        held_out.x_test[:180], held_out.y_test[:180], held_out.x_test[180:], held_out.y_test[180:]
    )
    # The DP epsilon is read from the manifest's privacy section.
    manifest = {
        **target.artifact.manifest,
        "privacy": {"epsilon": 2.5, "delta": 1e-5},
    }
    artifact = replace(target.artifact, manifest=manifest)
    result = audit(replace(target, artifact=artifact, split=split), shadows=2)
    assert result.epsilon == 2.5
    assert (result.members, result.non_members) == (180, 180)
    assert result.loss.auc == pytest.approx(0.5, abs=0.1)
    assert result.lira.auc == pytest.approx(0.5, abs=0.1)


@pytest.mark.slow
def test_cli_markdown_row_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "breast-cancer-mlp", "--shadows", "2", "--seed", "3", "--markdown"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    separator, row = out.strip().split("\n")[-2:]
    assert out.startswith(MARKDOWN_HEADER + "\n")
    assert "breast-cancer-mlp: audited in " in err
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["`breast-cancer-mlp`", "none"]
    manifest = load_artifact(DEFAULT_OUT_DIR / "breast-cancer-mlp").manifest
    assert float(cells[2]) == pytest.approx(manifest["training"]["poly_accuracy"], abs=5e-5)
    assert all(0.0 <= float(cell) <= 1.0 for cell in cells[3:7])
    assert cells[7] == "2"
    assert len(cells) == separator.count("|") - 1

    again = audit(load_target("breast-cancer-mlp"), shadows=2, seed=3)
    assert again.markdown_row() == row
    lines = again.lines()
    assert lines[0].startswith("breast-cancer-mlp: DP epsilon none, held-out accuracy ")
    assert "455 members (training split), 114 non-members (held-out split)" in lines[0]
    assert lines[1].startswith(f"  loss threshold: AUC {again.loss.auc:.4f}, TPR@1%FPR ")
    assert "LiRA (online, 2 shadow models, global variance)" in lines[2]
    assert "audited in" in lines[3]


def _copy_artifact(models_dir: Path, name: str) -> Path:
    target = models_dir / name
    shutil.copytree(DEFAULT_OUT_DIR / "breast-cancer-mlp", target)
    return target


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "no-such-model"], "unknown model 'no-such-model'; models that can be audited"),
        (["audit", "breast-cancer-mlp", "--shadows", "1"], "--shadows must be at least 2"),
        # Every name is checked before the first audit starts.
        (["audit", "breast-cancer-mlp", "nope"], "unknown model 'nope'"),
    ],
)
def test_cli_refuses_bad_names_and_shadow_counts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert "Traceback" not in err


def test_cli_refuses_an_artifact_that_is_not_a_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _copy_artifact(tmp_path, "my-net")
    assert main(["audit", "my-net", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'my-net' is not a model recipe: the audit needs the recipe" in err
    assert "training/held-out split" in err


def test_cli_refuses_a_missing_artifact_or_an_unknown_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "breast-cancer-mlp", "--models-dir", str(tmp_path)]) == 2
    assert "breast-cancer-mlp: no manifest.json" in capsys.readouterr().err

    directory = _copy_artifact(tmp_path, "breast-cancer-mlp")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["training"]["split_seed"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", "breast-cancer-mlp", "--models-dir", str(tmp_path)]) == 2
    assert "records no training split seed" in capsys.readouterr().err
