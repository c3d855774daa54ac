"""The differential-privacy claim: recomputed at load, refused when unsupported, on the card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from he_service import create_app
from he_service.artifacts import ArtifactError, load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.privacy import NO_PRIVACY, PrivacyClaimError, check_privacy, recompute_epsilon

DP_MODEL = "breast-cancer-mlp-dp"


def _privacy(name: str = DP_MODEL) -> dict[str, Any]:
    manifest = json.loads((DEFAULT_MODELS_DIR / name / "manifest.json").read_text())
    section: dict[str, Any] = manifest["privacy"]
    return section


@pytest.fixture
def dp_and_plain(tmp_path: Path) -> Path:
    """A private models directory with the DP model and its non-DP twin, which a test may damage."""
    target = tmp_path / "models"
    for name in (DP_MODEL, "breast-cancer-mlp"):
        shutil.copytree(DEFAULT_MODELS_DIR / name, target / name)
    return target


def test_the_shipped_claim_is_supported_by_dp_accounting() -> None:
    section = _privacy()
    assert check_privacy(section) is section
    phases = [(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in section["phases"]]
    recomputed = recompute_epsilon(phases, section["delta"])
    assert recomputed <= section["epsilon"]
    # A meaningful claim, not a loose one: within the noise search's tolerance of the target.
    assert recomputed > section["epsilon"] - 0.02


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A smaller epsilon than the noise supports: the lie this check exists for.
        (lambda p: p.update(epsilon=0.5, epsilon_spent=0.49), "give epsilon"),
        # Less noise than recorded: the recorded parameters no longer support the claim.
        (
            lambda p: (
                [q.update(noise_multiplier=1.0) for q in p["phases"]]
                and p.update(noise_multiplier=1.0)
            ),
            "give epsilon",
        ),
        (lambda p: p.update(steps=p["steps"] + 1), "not the sum over its phases"),
        (lambda p: p["phases"][0].update(sample_rate=0.5), "the section states"),
        (lambda p: p.pop("delta"), "privacy.delta must be a number"),
        (lambda p: p.update(delta=0.0), "0 < delta < 1"),
        (lambda p: p.update(accountant="prv"), "not 'rdp'"),
        (lambda p: p.update(expected_batch_size=400), "contradicts"),
        (lambda p: p.update(epsilon_spent=p["epsilon"] * 2), "epsilon_spent"),
        (lambda p: p.update(phases=[]), "must hold 1 to 16 phases"),
        (lambda p: p.update(phases=p["phases"] * 17), "must hold 1 to 16 phases"),
    ],
)
def test_a_claim_its_parameters_do_not_support_is_refused(
    edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    section = _privacy()
    edit(section)
    with pytest.raises(PrivacyClaimError, match=message):
        check_privacy(section)


def test_a_tampered_claim_is_refused_at_load_and_the_others_served(dp_and_plain: Path) -> None:
    path = dp_and_plain / DP_MODEL / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["privacy"].update(epsilon=0.1, epsilon_spent=0.1)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="differential-privacy claim refused"):
        load_artifact(dp_and_plain / DP_MODEL)
    test = create_app({"models_dir": dp_and_plain}).test_client()
    health = test.get("/v1/health").get_json()
    assert health["models"] == ["breast-cancer-mlp"]
    assert "claims epsilon 0.1" in health["refused"][DP_MODEL]
    assert test.get(f"/v1/models/{DP_MODEL}").status_code == 404


def test_cards_state_the_guarantee_or_its_absence(dp_and_plain: Path) -> None:
    test = create_app({"models_dir": dp_and_plain}).test_client()
    card = test.get(f"/v1/models/{DP_MODEL}").get_json()
    privacy = card["details"]["privacy"]
    section = _privacy()
    assert privacy["differential_privacy"] is True
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps"):
        assert privacy[key] == section[key]
    assert privacy["n_records"] == 455 and privacy["accountant"] == "rdp"
    assert (
        f"({section['epsilon']:g}, {section['delta']:g})-differentially private"
        in (privacy["statement"])
    )
    assert "reproducible demonstration" in privacy["noise_seed_note"]
    plain = test.get("/v1/models/breast-cancer-mlp").get_json()["details"]["privacy"]
    assert plain == NO_PRIVACY
    assert "without differential privacy" in plain["statement"]
