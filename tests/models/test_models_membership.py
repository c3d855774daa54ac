"""Membership-inference attack arithmetic and metrics, on hand-computed and synthetic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.membership import (
    attack_metrics,
    lira_scores,
    logit_confidence,
    loss_scores,
    shadow_membership,
)


def test_metrics_of_a_hand_computed_roc_curve() -> None:
    # Members score 3 and 1, non-members 2 and 0: three of the four member/non-member pairs
    # are ordered right. The ROC's upper points are (0, 1/2) and (1/2, 1), so 1% false
    # positives interpolate to 1/2 + (0.01 / 0.5) * 1/2 = 0.51.
    metrics = attack_metrics(np.array([3.0, 1.0, 2.0, 0.0]), np.array([1, 1, 0, 0], bool))
    assert metrics.auc == pytest.approx(0.75)
    assert metrics.tpr_at_low_fpr == pytest.approx(0.51)


@pytest.mark.parametrize(
    ("scores", "auc", "tpr"),
    [
        ([4.0, 3.0, 2.0, 1.0], 1.0, 1.0),  # members above every non-member
        ([1.0, 2.0, 3.0, 4.0], 0.0, 0.0),  # members below: nothing found without false alarms
        ([1.0, 1.0, 1.0, 1.0], 0.5, 0.01),  # one threshold: the diagonal, guessing
    ],
)
def test_metrics_of_separating_reversed_and_constant_scores(
    scores: list[float], auc: float, tpr: float
) -> None:
    metrics = attack_metrics(np.array(scores), np.array([1, 1, 0, 0], bool))
    assert metrics.auc == pytest.approx(auc)
    assert metrics.tpr_at_low_fpr == pytest.approx(tpr)


def test_metrics_need_both_classes_and_matching_shapes() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        attack_metrics(np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(ValueError, match="1-D alike"):
        attack_metrics(np.array([1.0, 2.0]), np.array([True, False, True]))


def test_loss_scores_are_minus_the_cross_entropy() -> None:
    outputs = np.array([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    scores = loss_scores(outputs, np.array([1, 0, 1]))
    np.testing.assert_allclose(scores, [math.log(0.5), math.log(0.75), math.log(0.25)])


def test_logit_confidence_is_log_odds_of_the_true_label() -> None:
    outputs = np.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(
        logit_confidence(outputs, np.array([0, 1, 0])), [math.log(3.0), -math.log(3.0), 0.0]
    )
    # Three classes, p = 1/3: log((1/3) / (2/3)).
    three = logit_confidence(np.zeros((1, 3)), np.array([2]))
    np.testing.assert_allclose(three, [math.log(0.5)])


def test_logit_confidence_stays_finite_where_softmax_saturates() -> None:
    # Polynomial networks give logits in the hundreds; p rounds to 1 or 0 in float64.
    outputs = np.array([[1000.0, 0.0], [1000.0, 0.0]])
    np.testing.assert_allclose(logit_confidence(outputs, np.array([0, 1])), [1000.0, -1000.0])


@pytest.mark.parametrize(
    ("shadows", "in_fraction", "inside"),
    [
        (2, 0.5, 1),
        (4, 0.5, 2),
        (7, 0.5, 4),  # round(3.5)
        (4, 0.8, 3),
        (5, 0.8, 4),
        (4, 0.99, 3),  # never IN for all: LiRA needs an OUT statistic
        (4, 0.01, 1),  # never OUT for all
    ],
)
def test_every_sample_trains_the_same_number_of_equal_shadow_models(
    shadows: int, in_fraction: float, inside: int
) -> None:
    samples = 40
    rng = np.random.default_rng(5)
    membership = shadow_membership(samples, shadows, rng, in_fraction=in_fraction)
    assert membership.shape == (shadows, samples)
    assert set(membership.sum(axis=0).tolist()) == {inside}
    # The OUT samples are spread evenly: training sets differ in size by at most one.
    out_share = samples * (shadows - inside) / shadows
    out_counts = set((samples - membership.sum(axis=1)).tolist())
    assert out_counts <= {math.floor(out_share), math.ceil(out_share)}
    # No two shadow models share their training set: each adds its own statistics.
    assert len({row.tobytes() for row in membership}) == shadows
    again = shadow_membership(samples, shadows, np.random.default_rng(5), in_fraction=in_fraction)
    np.testing.assert_array_equal(membership, again)


def test_shadow_membership_needs_two_shadow_models() -> None:
    with pytest.raises(ValueError, match="at least 2 shadow models"):
        shadow_membership(10, 1, np.random.default_rng(0))


def test_lira_with_global_variance_by_hand() -> None:
    # Sample 0 is IN for shadow 0 (statistic 3) and OUT for shadow 1 (1); sample 1 the reverse
    # (IN 2, OUT 0). Global standard deviations: std(3, 2) = std(1, 0) = 0.5. The log ratio of
    # two Gaussians with one std s is ((t - mu_out)^2 - (t - mu_in)^2) / (2 s^2).
    stats = np.array([[3.0, 0.0], [1.0, 2.0]])
    inside = np.array([[True, False], [False, True]])
    scores = lira_scores(np.array([3.0, 0.0]), stats, inside, global_variance=True)
    np.testing.assert_allclose(scores, [(4 - 0) / 0.5, (0 - 4) / 0.5])


def test_lira_with_per_sample_variance_by_hand() -> None:
    # Sample 0: IN statistics 1, 3 (mean 2, std 1), OUT -1, 1 (mean 0, std 1), target 2.
    # Sample 1: IN 5, 7 (mean 6, std 1), OUT 0, 2 (mean 1, std 1), target 1.
    stats = np.array([[1.0, 5.0], [3.0, 0.0], [-1.0, 2.0], [1.0, 7.0]])
    inside = np.array([[True, True], [True, False], [False, False], [False, True]])
    scores = lira_scores(np.array([2.0, 1.0]), stats, inside, global_variance=False)
    np.testing.assert_allclose(scores, [(4 - 0) / 2, (0 - 25) / 2])


def test_lira_refuses_samples_without_out_statistics() -> None:
    with pytest.raises(ValueError, match="at least one IN and one OUT"):
        lira_scores(np.zeros(2), np.zeros((2, 2)), np.ones((2, 2), bool), global_variance=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        lira_scores(np.zeros(3), np.zeros((2, 2)), np.ones((2, 2), bool), global_variance=True)


def _synthetic(
    effect: float, shadows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Statistics where each sample has its own difficulty and training on it adds ``effect``.

    Returns the target's statistics, the shadow models' statistics, their membership and the
    target's membership (the first half of the samples).
    """
    rng = np.random.default_rng(0)
    samples = 2000
    difficulty = rng.normal(0.0, 3.0, samples)
    is_member = np.arange(samples) < samples // 2
    inside = shadow_membership(samples, shadows, rng)
    noise = 0.5
    shadow_stats = difficulty + effect * inside + rng.normal(0.0, noise, inside.shape)
    target = difficulty + effect * is_member + rng.normal(0.0, noise, samples)
    return target, shadow_stats, inside, is_member


@pytest.mark.parametrize("global_variance", [True, False])
def test_lira_beats_a_threshold_when_samples_differ_in_difficulty(global_variance: bool) -> None:
    target, stats, inside, is_member = _synthetic(effect=1.0, shadows=16)
    threshold = attack_metrics(target, is_member)
    lira = attack_metrics(
        lira_scores(target, stats, inside, global_variance=global_variance), is_member
    )
    # Training shifts a sample's statistic by a third of the spread between samples: a global
    # threshold barely sees it, per-sample calibration does.
    assert threshold.auc < 0.65
    assert lira.auc > 0.8
    assert lira.tpr_at_low_fpr > threshold.tpr_at_low_fpr + 0.05


def test_lira_finds_nothing_when_membership_changes_nothing() -> None:
    target, stats, inside, is_member = _synthetic(effect=0.0, shadows=16)
    for global_variance in (True, False):
        scores = lira_scores(target, stats, inside, global_variance=global_variance)
        assert attack_metrics(scores, is_member).auc == pytest.approx(0.5, abs=0.04)
