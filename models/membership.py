"""Membership-inference attacks and their metrics, computed from a classifier's outputs.

Two attacks score how likely each sample is to have been in the training set (higher: more
likely a member):

- the loss-threshold attack (Yeom et al., CSF 2018): the score is minus the cross-entropy loss
  of the true label, so samples the model fits unusually well look like members;
- the online likelihood-ratio attack (LiRA; Carlini et al., "Membership Inference Attacks From
  First Principles", S&P 2022): shadow models trained with and without each sample give, per
  sample, Gaussian fits of the logit-scaled confidence ``log(p / (1 - p))`` of its true label
  when IN and when OUT; the score is the log-likelihood ratio of the target's confidence under
  the two fits. Calibrating per sample removes the "easy sample" effect that blunts the loss
  attack.

An attack is summarised by the area under its ROC curve and its true-positive rate at a 1%
false-positive rate (the regime the LiRA paper argues matters: confidently identifying a few
members).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax, logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "GLOBAL_VARIANCE_BELOW",
    "LOW_FPR",
    "AttackMetrics",
    "attack_metrics",
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "shadow_membership",
]

LOW_FPR = 0.01
# Fewer shadow models than this give too few IN/OUT statistics per sample for a per-sample
# variance; LiRA then fits one variance for all samples (the paper's choice below 64 models).
GLOBAL_VARIANCE_BELOW = 64
# A floor for fitted standard deviations, as in the LiRA reference code: a sample whose shadow
# statistics are all equal must not divide by zero.
_MIN_STD = 1e-30


@dataclass(frozen=True)
class AttackMetrics:
    """How well an attack's scores separate members from non-members.

    ``auc`` is the ROC AUC (0.5: no better than guessing); ``tpr_at_low_fpr`` the fraction of
    members found at a false-positive rate of ``LOW_FPR``, read from the ROC curve by linear
    interpolation.
    """

    auc: float
    tpr_at_low_fpr: float


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> AttackMetrics:
    """Compute an attack's ROC AUC and its true-positive rate at 1% false positives.

    Args:
        scores: one score per sample, higher meaning "more likely a member".
        is_member: booleans, the truth; both classes must occur.

    Returns:
        The metrics.

    Raises:
        ValueError: if the arrays differ in length or one class is missing.
    """
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and membership {truth.shape} must be 1-D alike")
    if truth.all() or not truth.any():
        raise ValueError("attack metrics need both members and non-members")
    fpr, tpr, _ = roc_curve(truth, scores)
    # A vertical step of the curve has one false-positive rate for several true-positive
    # rates; the attacker takes the best of them, and np.interp needs increasing x values.
    steps, last = np.unique(fpr[::-1], return_index=True)
    best_tpr = tpr[::-1][last]
    return AttackMetrics(
        auc=float(roc_auc_score(truth, scores)),
        tpr_at_low_fpr=float(np.interp(LOW_FPR, steps, best_tpr)),
    )


def loss_scores(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the loss-threshold attack's scores: minus each sample's cross-entropy loss.

    Args:
        outputs: class scores (logits) ``(n, classes)``.
        labels: true labels ``(n,)``.

    Returns:
        ``log softmax(outputs)[label]`` per sample, shape ``(n,)``.
    """
    log_p = log_softmax(np.asarray(outputs, dtype=np.float64), axis=1)
    scores: np.ndarray = log_p[np.arange(len(labels)), np.asarray(labels)]
    return scores


def logit_confidence(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``log(p / (1 - p))`` of the true label's softmax probability ``p``, stably.

    ``log p - log(1 - p)`` equals the true logit minus the log-sum-exp of the other logits,
    which stays finite where ``p`` rounds to 1 (polynomial networks give large logits). LiRA
    models this statistic as Gaussian, which the probability itself is not.

    Args:
        outputs: class scores (logits) ``(n, classes)``, at least two classes.
        labels: true labels ``(n,)``.

    Returns:
        The statistic per sample, shape ``(n,)``.
    """
    logits = np.asarray(outputs, dtype=np.float64)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, np.asarray(labels)] = -np.inf
    confidence: np.ndarray = logits[rows, labels] - logsumexp(others, axis=1)
    return confidence


def shadow_membership(
    samples: int, shadows: int, rng: np.random.Generator, *, in_fraction: float = 0.5
) -> np.ndarray:
    """Choose which pool samples train which shadow model.

    Every sample is IN for the same number of shadow models, ``round(shadows * in_fraction)``
    kept between 1 and ``shadows - 1`` so that it has IN and OUT statistics, and every shadow
    model trains on the same number of samples, give or take one: taken in random order, each
    sample is OUT for the shadow models with the fewest OUT samples so far, ties broken at
    random. ``in_fraction`` is the share of the pool the target trained on: shadow models
    must resemble the target, and a model trained on less data is less confident on every
    sample, members or not.

    Args:
        samples: size of the pool.
        shadows: number of shadow models, at least 2.
        rng: the random generator (seeded by the caller).
        in_fraction: the share of the pool each shadow model should train on.

    Returns:
        Booleans ``(shadows, samples)``: True where the sample trains the shadow model.

    Raises:
        ValueError: if ``shadows < 2``.
    """
    if shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {shadows}")
    outside = shadows - min(max(round(shadows * in_fraction), 1), shadows - 1)
    membership = np.ones((shadows, samples), dtype=bool)
    out_counts = np.zeros(shadows)
    for sample in rng.permutation(samples):
        # Counts are integers: the random fraction only breaks ties among the least loaded.
        chosen = np.argsort(out_counts + rng.random(shadows))[:outside]
        membership[chosen, sample] = False
        out_counts[chosen] += 1
    return membership


def lira_scores(
    target: np.ndarray,
    shadow_statistics: np.ndarray,
    shadow_in: np.ndarray,
    *,
    global_variance: bool,
) -> np.ndarray:
    """Score samples with the online likelihood-ratio attack.

    Args:
        target: the target model's statistic per sample ``(n,)`` (``logit_confidence``).
        shadow_statistics: the same statistic from each shadow model ``(shadows, n)``.
        shadow_in: which samples trained which shadow model ``(shadows, n)``.
        global_variance: fit one standard deviation for all IN statistics and one for all OUT
            statistics (as the reference code does) instead of one per sample; needed when
            each sample has only a few shadow models on either side.

    Returns:
        ``log N(target; mu_in, s_in) - log N(target; mu_out, s_out)`` per sample.

    Raises:
        ValueError: if the shapes disagree or a sample is never IN or never OUT.
    """
    stats = np.asarray(shadow_statistics, dtype=np.float64)
    inside = np.asarray(shadow_in, dtype=bool)
    target = np.asarray(target, dtype=np.float64)
    if stats.shape != inside.shape or stats.ndim != 2 or target.shape != stats.shape[1:]:
        raise ValueError(
            f"shapes disagree: target {target.shape}, shadow statistics {stats.shape}, "
            f"shadow membership {inside.shape}"
        )
    n_in, n_out = inside.sum(axis=0), (~inside).sum(axis=0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("every sample needs at least one IN and one OUT shadow model")
    mean_in = np.where(inside, stats, 0.0).sum(axis=0) / n_in
    mean_out = np.where(inside, 0.0, stats).sum(axis=0) / n_out
    if global_variance:
        std_in = np.full_like(target, stats[inside].std())
        std_out = np.full_like(target, stats[~inside].std())
    else:
        std_in = np.sqrt(np.where(inside, (stats - mean_in) ** 2, 0.0).sum(axis=0) / n_in)
        std_out = np.sqrt(np.where(inside, 0.0, (stats - mean_out) ** 2).sum(axis=0) / n_out)
    log_in = norm.logpdf(target, mean_in, np.maximum(std_in, _MIN_STD))
    log_out = norm.logpdf(target, mean_out, np.maximum(std_out, _MIN_STD))
    scores: np.ndarray = log_in - log_out
    return scores
