"""Audit an artifact's training-data leakage with membership-inference attacks.

The target is the artifact's plaintext polynomial network (what the server computes, run by
``models.evaluation.artifact_forward``) on its own split: members are the training samples,
non-members the held-out ones. The loss-threshold attack needs only the target; LiRA trains
shadow models with the artifact's recipe (``Recipe.prepare_split``: plaintext training,
conversion, fine-tuning) on random subsets of the pool of both, each as large as the target's
training split, so the audit needs the recipe and the split the manifest records (see
``models.membership`` for the attacks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from he_service.artifacts import ArtifactError, ModelArtifact, load_artifact
from models.datasets import Split
from models.evaluation import artifact_forward
from models.membership import (
    GLOBAL_VARIANCE_BELOW,
    LOW_FPR,
    AttackMetrics,
    attack_metrics,
    lira_scores,
    logit_confidence,
    loss_scores,
    shadow_membership,
)
from models.recipes import DEFAULT_OUT_DIR, RECIPES, Recipe
from models.training import model_outputs, preprocess_batch

__all__ = [
    "DEFAULT_SHADOWS",
    "MARKDOWN_HEADER",
    "AuditError",
    "AuditResult",
    "AuditTarget",
    "audit",
    "load_target",
]

# The LiRA paper trains hundreds; 8 already give a global-variance fit and keep an audit of
# mnist-cnn near a minute on two cores (one shadow model is one run of the recipe).
DEFAULT_SHADOWS = 8
MARKDOWN_HEADER = (
    "| model | DP epsilon | held-out accuracy | loss attack AUC | loss TPR@1%FPR "
    "| LiRA AUC | LiRA TPR@1%FPR | shadows |\n"
    "|---|---|---|---|---|---|---|---|"
)


class AuditError(ValueError):
    """The named artifact cannot be audited; the message says why."""


@dataclass(frozen=True)
class AuditTarget:
    """An artifact together with the recipe and the split it was trained on."""

    name: str
    artifact: ModelArtifact
    recipe: Recipe
    split: Split
    split_seed: int


@dataclass(frozen=True)
class AuditResult:
    """What the attacks found against one artifact.

    ``epsilon`` is the manifest's DP guarantee (None: trained without DP); ``loss`` and
    ``lira`` are the attacks' metrics on ``members`` training and ``non_members`` held-out
    samples; ``shadow_accuracy`` is the shadow models' mean accuracy on the pool samples they
    did not train on (a check that they resemble the target).
    """

    name: str
    epsilon: float | None
    held_out_accuracy: float
    members: int
    non_members: int
    loss: AttackMetrics
    lira: AttackMetrics
    shadows: int
    global_variance: bool
    shadow_accuracy: float
    seconds: float

    def lines(self) -> list[str]:
        """Return the human-readable report, one line each."""
        epsilon = "none" if self.epsilon is None else f"{self.epsilon:g}"
        variance = "global" if self.global_variance else "per-sample"
        fpr = f"TPR@{LOW_FPR:.0%}FPR"
        return [
            f"{self.name}: DP epsilon {epsilon}, held-out accuracy "
            f"{self.held_out_accuracy:.4f}; {self.members} members (training split), "
            f"{self.non_members} non-members (held-out split)",
            f"  loss threshold: AUC {self.loss.auc:.4f}, {fpr} {self.loss.tpr_at_low_fpr:.4f}",
            f"  LiRA (online, {self.shadows} shadow models, {variance} variance): AUC "
            f"{self.lira.auc:.4f}, {fpr} {self.lira.tpr_at_low_fpr:.4f}",
            f"  shadow models' accuracy on their non-members {self.shadow_accuracy:.4f}; "
            f"audited in {self.seconds:.1f} s",
        ]

    def markdown_row(self) -> str:
        """Return one row of the table under ``MARKDOWN_HEADER``."""
        epsilon = "none" if self.epsilon is None else f"{self.epsilon:g}"
        cells = [
            f"`{self.name}`",
            epsilon,
            f"{self.held_out_accuracy:.4f}",
            f"{self.loss.auc:.3f}",
            f"{self.loss.tpr_at_low_fpr:.3f}",
            f"{self.lira.auc:.3f}",
            f"{self.lira.tpr_at_low_fpr:.3f}",
            str(self.shadows),
        ]
        return "| " + " | ".join(cells) + " |"


def load_target(name: str, models_dir: Path = DEFAULT_OUT_DIR) -> AuditTarget:
    """Load an artifact and the recipe and split an audit needs.

    Args:
        name: artifact name; it must also be a recipe.
        models_dir: directory holding ``<name>/``.

    Returns:
        The target.

    Raises:
        AuditError: for an unknown name, an artifact that is not a recipe, an unreadable
            artifact, or a manifest that does not record its split.
    """
    directory = Path(models_dir) / name
    if name not in RECIPES:
        if (directory / "manifest.json").is_file():
            raise AuditError(
                f"{name!r} is not a model recipe: the audit needs the recipe (to train shadow "
                "models) and the training/held-out split, which only recipes have"
            )
        known = ", ".join(sorted(RECIPES))
        raise AuditError(f"unknown model {name!r}; models that can be audited: {known}")
    try:
        artifact = load_artifact(directory)
    except ArtifactError as exc:
        raise AuditError(str(exc)) from None
    split_seed = artifact.manifest.get("training", {}).get("split_seed")
    if not isinstance(split_seed, int):
        raise AuditError(
            f"{directory} records no training split seed (training.split_seed); it was not "
            f"made by `he-models train {name}` and its members are unknown"
        )
    recipe = RECIPES[name]
    return AuditTarget(name, artifact, recipe, recipe.load_split(split_seed), split_seed)


def _epsilon(manifest: dict[str, Any]) -> float | None:
    # Only DP-trained artifacts have a privacy section; the loader has checked its epsilon.
    privacy = manifest.get("privacy")
    if isinstance(privacy, dict) and "epsilon" in privacy:
        return float(privacy["epsilon"])
    return None


def audit(target: AuditTarget, *, shadows: int = DEFAULT_SHADOWS, seed: int = 0) -> AuditResult:
    """Run the loss-threshold attack and LiRA against an artifact.

    Deterministic for a seed: the seed picks each shadow model's training samples and its
    training seed, and recipes train deterministically.

    Args:
        target: from ``load_target``.
        shadows: number of shadow models, at least 2; each sample trains as many of them
            as the training split's share of the pool says (but at least one, and never all).
        seed: seed of the shadow models' data and training seeds.

    Returns:
        The attacks' metrics, the target's held-out accuracy and DP epsilon, the time taken.

    Raises:
        ValueError: if ``shadows < 2``.
    """
    started = time.perf_counter()
    artifact, split = target.artifact, target.split
    pool_x = np.concatenate([split.x_train, split.x_test])
    pool_y = np.concatenate([split.y_train, split.y_test])
    is_member = np.arange(len(pool_y)) < split.n_train
    x = preprocess_batch(pool_x, artifact.preprocessing, artifact.input_shape)
    outputs, _ = artifact_forward(artifact, x)
    held_out_accuracy = float(np.mean(outputs[~is_member].argmax(axis=1) == split.y_test))

    rng = np.random.default_rng(seed)
    shadow_in = shadow_membership(
        len(pool_y), shadows, rng, in_fraction=split.n_train / len(pool_y)
    )
    training_seeds = rng.integers(2**31, size=shadows)
    statistics = np.empty(shadow_in.shape)
    correct = []
    for k in range(shadows):
        inside = shadow_in[k]
        part = Split(pool_x[inside], pool_y[inside], pool_x[~inside], pool_y[~inside])
        trained = target.recipe.prepare_split(part, int(training_seeds[k]), target.split_seed)
        # Shadow models are not exported (that compiles CKKS plans): their float64 network is
        # the function their artifact would compute, fed with their own preprocessing.
        shadow_x = preprocess_batch(
            pool_x, trained.manifest["input"]["preprocessing"], artifact.input_shape
        )
        shadow_outputs = model_outputs(trained.network, shadow_x)
        statistics[k] = logit_confidence(shadow_outputs, pool_y)
        correct.append(shadow_outputs[~inside].argmax(axis=1) == pool_y[~inside])

    global_variance = shadows < GLOBAL_VARIANCE_BELOW
    lira = lira_scores(
        logit_confidence(outputs, pool_y), statistics, shadow_in, global_variance=global_variance
    )
    return AuditResult(
        name=target.name,
        epsilon=_epsilon(artifact.manifest),
        held_out_accuracy=held_out_accuracy,
        members=split.n_train,
        non_members=split.n_test,
        loss=attack_metrics(loss_scores(outputs, pool_y), is_member),
        lira=attack_metrics(lira, is_member),
        shadows=shadows,
        global_variance=global_variance,
        shadow_accuracy=float(np.mean(np.concatenate(correct))),
        seconds=time.perf_counter() - started,
    )
