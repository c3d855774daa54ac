"""Fine-tune a converted network so that it recovers accuracy and stays in its fitted ranges.

Replacing ReLU by a degree-2 polynomial changes every later layer's input; a few epochs of
training with the polynomials in place let the weights adapt. The polynomials themselves stay
fixed (they are what the report and the manifest describe). A penalty keeps each activation's
inputs inside the range its polynomial was fitted on: outside it a polynomial grows like
``x^degree`` and one stray value can swamp the logits. Residual blocks are trained through like
any other module; their frozen per-channel scales (skip connections) stay as they are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from he_service.artifacts import DEFAULT_TASK
from models.conversion import ConvertedNetwork
from models.polynomial import PolyActivation
from models.privacy import PrivacyBudget, PrivatePhase, PrivateTraining
from models.training import (
    TrainConfig,
    Trainer,
    deterministic_torch,
    target_tensor,
    to_tensor,
    train_loop,
)

__all__ = ["FineTuneConfig", "FineTuning", "fine_tune", "out_of_range_fractions"]


@dataclass(frozen=True)
class FineTuneConfig:
    """Hyper-parameters of fine-tuning; ``range_weight`` scales the out-of-range penalty."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    range_weight: float = 1.0
    seed: int = 0

    def to_json(self) -> dict[str, object]:
        """Return the manifest form."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": TrainConfig(
                lr=self.lr, weight_decay=self.weight_decay
            ).optimizer_description(),
            "range_weight": self.range_weight,
            "seed": self.seed,
        }


def _ranged(network: nn.Module) -> list[PolyActivation]:
    return [
        m
        for m in network.modules()
        if isinstance(m, PolyActivation) and math.isfinite(m.lo) and math.isfinite(m.hi)
    ]


def fine_tune(
    network: ConvertedNetwork,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    config: FineTuneConfig | None = None,
    *,
    task: str = DEFAULT_TASK,
    trainer: Trainer = train_loop,
) -> ConvertedNetwork:
    """Train the affine layers of a copy of ``network`` with its polynomials in place.

    The loss is the task's (cross-entropy for classification, mean squared error for
    regression) plus ``range_weight`` times, for every fitted polynomial, the mean squared
    distance of its inputs outside ``[lo, hi]`` relative to the range's half width. Average
    poolings, per-channel scales and polynomial coefficients stay fixed. Deterministic for a
    seed.

    Args:
        network: a converted network; not modified.
        x: preprocessed training inputs ``(n, *input_shape)``.
        y: int labels ``(n,)``, or regression targets ``(n,)`` / ``(n, outputs)``.
        config: hyper-parameters; defaults to ``FineTuneConfig()``.
        task: ``classification`` or ``regression``.
        trainer: what trains the copy; ``train_loop`` by default, or a private phase
            (``models.privacy.PrivateTraining.trainer``) on the same records.

    Returns:
        The fine-tuned copy, float64, eval mode.

    Raises:
        ValueError: for an unknown task.
    """
    cfg = config or FineTuneConfig()
    inputs = to_tensor(x, torch.float32)
    labels = target_tensor(y, task)
    with deterministic_torch(cfg.seed):
        tuned = copy.deepcopy(network).to(torch.float32)
        penalties: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert isinstance(module, PolyActivation)
            penalties.append(module.range_excess(args[0]))

        def penalty() -> torch.Tensor:
            total = torch.stack(penalties).sum() * cfg.range_weight
            penalties.clear()
            return total

        handles = [m.register_forward_pre_hook(record) for m in _ranged(tuned)]
        try:
            trainer(
                tuned,
                inputs,
                labels,
                TrainConfig(
                    seed=cfg.seed,
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                ),
                extra_loss=penalty if handles else None,
                task=task,
            )
        finally:
            for handle in handles:
                handle.remove()
    return tuned.to(torch.float64).eval()


# What a private fine-tuning after ``convert`` cannot cover.
_CONVERT_OUTSIDE = (
    "the network's weights before fine-tuning (--weights) and the calibration data "
    "(--calibration: activation ranges, --standardize statistics, the output bound and the "
    "per-output ranges): the guarantee covers only the fine-tuning records, so neither may "
    "hold them",
)


@dataclass(frozen=True)
class FineTuning:
    """Fine-tuning of a converted network on given records, planned (and priced) beforehand.

    ``session`` is the DP-SGD run when fine-tuning is private, None otherwise.
    """

    x: np.ndarray
    y: np.ndarray
    config: FineTuneConfig
    task: str
    dataset: str
    session: PrivateTraining | None

    @classmethod
    def plan(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        task: str = DEFAULT_TASK,
        privacy: PrivacyBudget | None = None,
        dataset: str = "",
    ) -> FineTuning:
        """Check the options and choose the DP noise, before anything is trained.

        Args:
            x: preprocessed records ``(n, *input_shape)``.
            y: their labels or regression targets.
            epochs: fine-tuning epochs.
            batch_size: the batch size (the expected one under DP).
            lr: Adam's learning rate.
            task: ``classification`` or ``regression``.
            privacy: a DP-SGD budget, or None for ordinary fine-tuning.
            dataset: how the manifest names the records.

        Returns:
            The plan.

        Raises:
            PrivacyError: no noise multiplier meets the budget.
        """
        config = FineTuneConfig(epochs=epochs, batch_size=batch_size, lr=lr)
        session = None
        if privacy is not None:
            session = PrivateTraining(
                privacy, to_tensor(x, torch.float32), target_tensor(y, task), batch_size, [epochs]
            )
        return cls(x, y, config, task, dataset, session)

    def run(
        self, network: ConvertedNetwork
    ) -> tuple[ConvertedNetwork, dict[str, Any], dict[str, Any] | None]:
        """Fine-tune a copy of ``network``.

        Args:
            network: the converted network; not modified.

        Returns:
            The fine-tuned copy, the manifest's ``training`` section and, when private, its
            ``privacy`` section.
        """
        trainer: Trainer = train_loop
        if self.session is not None:
            trainer = self.session.trainer(
                PrivatePhase("fine-tuning", self.config.epochs, self.config.lr)
            )
        tuned = fine_tune(network, self.x, self.y, self.config, task=self.task, trainer=trainer)
        training = {"fine_tuning": self.config.to_json(), "fine_tune_samples": len(self.y)}
        if self.session is None:
            return tuned, training, None
        section = self.session.section(dataset=self.dataset, outside_guarantee=_CONVERT_OUTSIDE)
        return tuned, training, section


def out_of_range_fractions(network: ConvertedNetwork, x: np.ndarray | torch.Tensor) -> list[float]:
    """Return, per fitted polynomial, the fraction of its inputs outside its fitted range.

    Args:
        network: a converted network.
        x: preprocessed inputs ``(n, *input_shape)``.

    Returns:
        One fraction per polynomial with a finite range, in network order.
    """
    modules = _ranged(network)
    counts: dict[int, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, PolyActivation)
        value = args[0]
        outside = int(((value < module.lo) | (value > module.hi)).sum())
        seen, out = counts.get(id(module), (0, 0))
        counts[id(module)] = (seen + value.numel(), out + outside)

    handles = [m.register_forward_pre_hook(record) for m in modules]
    dtype = next(network.parameters()).dtype
    try:
        with torch.no_grad():
            network(to_tensor(x, dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [counts[id(m)][1] / max(counts[id(m)][0], 1) for m in modules]
