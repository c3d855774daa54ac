"""Train with differential privacy: DP-SGD by Opacus, and the guarantee the manifest records.

DP-SGD (Abadi et al. 2016) clips each record's gradient to ``max_grad_norm``, adds Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` to the sum, and samples every
batch by including each record independently with probability ``sample_rate`` (Poisson
sampling, which the accountant's amplification assumes). The RDP accountant turns the noise
multiplier, the sampling rate and the number of steps into ``(epsilon, delta)``.

The order matters: ``PrivacyBudget`` refuses contradictory options and ``plan_noise`` picks the
noise multiplier for the target epsilon (Opacus' ``get_noise_multiplier``) *before* any training,
so a budget no noise can meet fails at once. A ``PrivateTraining`` then runs one or more phases
on the same records (ReLU training, then fine-tuning of the polynomial network) with one
accountant, so their composition is what the target bounds.

The noise seed: the shipped DP artifacts are rebuilt bit for bit by the tests, so their noise is
seeded and the seed is published. The guarantee assumes noise nobody can regenerate, so a
published seed makes the artifact a reproducible demonstration; without a seed, the seed is drawn
from ``secrets`` and not recorded.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from he_service.artifacts import DEFAULT_TASK
from he_service.privacy import ACCOUNTANT, recompute_epsilon
from models.training import TrainConfig, Trainer

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_MAX_GRAD_NORM",
    "UNIT",
    "NoisePlan",
    "PrivacyBudget",
    "PrivacyError",
    "PrivatePhase",
    "PrivateTraining",
    "plan_noise",
    "private_network",
    "train_without_noise",
]

DEFAULT_DELTA = 1e-5
DEFAULT_MAX_GRAD_NORM = 1.0
UNIT = "one training record (add/remove adjacency)"
# Each raise of the noise multiplier when the server's accountant disagrees in the last digits.
_NUDGE = 1.0005


class PrivacyError(ValueError):
    """Differential-privacy options that contradict each other or that no noise can meet."""


@dataclass(frozen=True)
class PrivacyBudget:
    """The guarantee asked for: ``(epsilon, delta)``, the clipping norm and the noise seed.

    ``noise_seed`` None draws a secret seed from ``secrets`` (not recorded); an integer makes
    the run reproducible and is published in the manifest.
    """

    epsilon: float
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyError(f"--dp-epsilon must be a positive number, got {self.epsilon:g}")
        if not 0 < self.delta < 1:
            raise PrivacyError(
                f"--dp-delta must be in (0, 1) for a DP guarantee, got {self.delta:g} (a "
                "common choice is below 1 / the number of training records, e.g. 1e-5)"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyError(f"--max-grad-norm must be positive, got {self.max_grad_norm:g}")
        if self.noise_seed is not None and self.noise_seed < 0:
            raise PrivacyError(f"--dp-noise-seed must be >= 0, got {self.noise_seed}")


@dataclass(frozen=True)
class PrivatePhase:
    """Hyper-parameters of one DP-SGD phase: epochs and the optimizer.

    ``optimizer`` is ``adam`` or ``sgd`` (with ``momentum``); the batch size is the run's.
    """

    name: str
    epochs: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def make_optimizer(self, parameters: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """Return the optimizer over ``parameters``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def description(self) -> str:
        """Return the optimizer as the manifest records it, e.g. ``SGD(lr=0.1, momentum=0.9)``."""
        extra = f", weight_decay={self.weight_decay!r}" if self.weight_decay else ""
        if self.optimizer == "sgd":
            return f"SGD(lr={self.lr!r}, momentum={self.momentum!r}{extra})"
        return f"Adam(lr={self.lr!r}{extra})"


@dataclass(frozen=True)
class NoisePlan:
    """The noise multiplier chosen for a budget, and the sampling it assumes."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    steps_per_epoch: int
    steps: int


def plan_noise(
    budget: PrivacyBudget, n_records: int, batch_size: int, epochs: Sequence[int]
) -> NoisePlan:
    """Choose the noise multiplier that meets the budget over every phase, before training.

    Opacus samples each record with probability ``1 / ceil(n / batch_size)`` and takes
    ``ceil(n / batch_size)`` steps per epoch; the noise multiplier is the smallest that
    ``get_noise_multiplier`` finds for the total steps, raised by a hair if the server's
    ``dp-accounting`` check (``he_service.privacy``) would compute an epsilon above the target.

    Args:
        budget: the target guarantee.
        n_records: the number of private training records.
        batch_size: the expected batch size.
        epochs: the epochs of each private phase.

    Returns:
        The plan.

    Raises:
        PrivacyError: no noise multiplier meets the budget for these epochs, or the sizes are
            not positive.
    """
    if n_records < 1 or batch_size < 1 or not epochs or min(epochs) < 1:
        raise PrivacyError("private training needs records, a positive batch size and epochs")
    steps_per_epoch = math.ceil(n_records / batch_size)
    sample_rate = 1 / steps_per_epoch
    steps = steps_per_epoch * sum(epochs)
    try:
        with warnings.catch_warnings():
            # Its search tries tiny noise too, where the best order is the largest one it knows.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=budget.epsilon,
                    target_delta=budget.delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=ACCOUNTANT,
                )
            )
    except ValueError:
        raise PrivacyError(
            f"no noise multiplier reaches epsilon {budget.epsilon:g} at delta {budget.delta:g} "
            f"over {sum(epochs)} epochs ({steps} steps at sampling rate {sample_rate:.4g}); "
            "raise --dp-epsilon or --dp-delta, or train fewer epochs"
        ) from None
    # The two accountants agree to ~1e-3 at fractional orders: make the server's agree too.
    while recompute_epsilon([(sigma, sample_rate, steps)], budget.delta) > budget.epsilon:
        sigma *= _NUDGE
    return NoisePlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        expected_batch_size=int(n_records * sample_rate),
        steps_per_epoch=steps_per_epoch,
        steps=steps,
    )


def private_network(model: nn.Module) -> nn.Module:
    """Return ``model`` made trainable by Opacus: BatchNorm replaced by GroupNorm.

    BatchNorm mixes the records of a batch, so per-record gradients (and the guarantee) do not
    exist for it. Opacus' ``ModuleValidator.fix`` replaces a BatchNorm over ``C`` channels by
    ``GroupNorm(gcd(32, C), C)``; over the features of a vector that would normalise each
    feature by itself (a constant), so ``BatchNorm1d`` becomes ``GroupNorm(1, C)``, a layer norm.

    Args:
        model: the network; it is modified in place and returned.

    Returns:
        The fixed network.

    Raises:
        PrivacyError: a layer Opacus cannot train privately remains (all are listed).
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm1d):
                setattr(parent, name, nn.GroupNorm(1, child.num_features, affine=child.affine))
    fixed: nn.Module = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        listed = "; ".join(str(problem) for problem in problems)
        raise PrivacyError(f"Opacus cannot train this network privately: {listed}")
    return fixed


def train_without_noise(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    phase: PrivatePhase,
    batch_size: int,
    max_grad_norm: float,
) -> None:
    """Run DP-SGD's steps with noise multiplier 0: the non-private baseline of a DP recipe.

    Poisson sampling and per-record clipping stay, so comparing it with a private run shows
    what the noise alone costs. No guarantee holds (epsilon is infinite). Call it inside
    ``deterministic_torch``: the sampling uses torch's global generator.

    Args:
        model: the network (fixed for Opacus); trained in place, left in eval mode.
        x: the preprocessed records.
        y: their labels.
        phase: epochs and optimizer.
        batch_size: the expected batch size.
        max_grad_norm: the clipping norm.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()  # Opacus refuses a module in eval mode
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        wrapped, optimizer, batches = engine.make_private(
            module=model,
            optimizer=phase.make_optimizer(trainable),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
        _epochs(wrapped, optimizer, batches, phase.epochs, nn.CrossEntropyLoss(), None)
    wrapped._close()
    model.eval()


def _epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: DataLoader[Any],
    epochs: int,
    loss_fn: nn.Module,
    extra_loss: Callable[[], torch.Tensor] | None,
) -> int:
    """Train for ``epochs`` passes over ``batches``; return the number of steps."""
    steps = 0
    for _ in range(epochs):
        for xb, yb in batches:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


class PrivateTraining:
    """DP-SGD over one set of private records, in one or more phases sharing one accountant.

    Args:
        budget: the target guarantee.
        x: the preprocessed private records (float32).
        y: their targets.
        batch_size: the expected batch size of every phase.
        epochs: the epochs of each phase to come, in order (the noise is planned for all).

    Raises:
        PrivacyError: the budget cannot be met (before any training).
    """

    def __init__(
        self,
        budget: PrivacyBudget,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        epochs: Sequence[int],
    ) -> None:
        self.budget = budget
        self.plan = plan_noise(budget, len(y), batch_size, epochs)
        self.batch_size = batch_size
        self._planned = list(epochs)
        self._records = TensorDataset(x, y)
        seed = budget.noise_seed if budget.noise_seed is not None else secrets.randbits(63)
        # Two independent streams: the Poisson sampling (torch's global generator, which Opacus
        # uses) and the Gaussian noise. Both must be as secret as the guarantee assumes.
        sampling, noise = np.random.SeedSequence(seed).generate_state(2)
        self._sampling_seed = int(sampling)
        self._noise = torch.Generator().manual_seed(int(noise))
        with warnings.catch_warnings():
            # Opacus' advice to use its secure RNG (torchcsprng, not installed): the manifest
            # states what the noise seed is instead.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self._engine = PrivacyEngine(accountant=ACCOUNTANT)
        self.phases: list[dict[str, Any]] = []

    def train(
        self,
        model: nn.Module,
        phase: PrivatePhase,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        task: str = DEFAULT_TASK,
    ) -> None:
        """Run one private phase on ``model`` in place (trainable parameters only).

        Args:
            model: the network, fixed for Opacus (``private_network``).
            phase: epochs and optimizer; the phases must come in the planned order.
            extra_loss: called after each forward pass, added to the loss (a mean over the
                batch of per-record terms, like the loss itself).
            task: ``classification`` (cross-entropy) or ``regression`` (mean squared error).

        Raises:
            PrivacyError: the phase is not the next planned one.
        """
        index = len(self.phases)
        if index >= len(self._planned) or phase.epochs != self._planned[index]:
            raise PrivacyError(
                f"phase {phase.name!r} ({phase.epochs} epochs) was not planned: {self._planned}"
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        loader = DataLoader(self._records, batch_size=self.batch_size)
        loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        model.train()  # Opacus refuses a module in eval mode
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # torch's note that no input needs a gradient: the records never do.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(self._sampling_seed + index)
            private, optimizer, batches = self._engine.make_private(
                module=model,
                optimizer=phase.make_optimizer(trainable),
                data_loader=loader,
                noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.budget.max_grad_norm,
                poisson_sampling=True,
                noise_generator=self._noise,
            )
            steps = _epochs(private, optimizer, batches, phase.epochs, loss_fn, extra_loss)
        private._close()
        model.eval()
        self.phases.append(
            {
                "name": phase.name,
                "epochs": phase.epochs,
                "steps": steps,
                "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": self.plan.sample_rate,
                "optimizer": phase.description(),
            }
        )

    def trainer(self, phase: PrivatePhase) -> Trainer:
        """Return a ``Trainer`` that runs ``phase`` (e.g. for ``models.fine_tune``).

        The trainer is handed the records again; they must be the private records of this
        run (the guarantee counts them once), and the config's batch size is this run's.
        """

        def run(
            model: nn.Module,
            x: torch.Tensor,
            y: torch.Tensor,
            config: TrainConfig,
            extra_loss: Callable[[], torch.Tensor] | None = None,
            task: str = DEFAULT_TASK,
        ) -> None:
            records, targets = self._records.tensors
            if x.shape != records.shape or not torch.equal(y, targets.to(y.dtype)):
                raise PrivacyError("a private phase must train on the run's own records")
            self.train(model, phase, extra_loss, task)

        return run

    def section(self, *, dataset: str, outside_guarantee: Sequence[str]) -> dict[str, Any]:
        """Return the manifest's ``privacy`` section once every planned phase has run.

        Args:
            dataset: the private data set and split the guarantee refers to.
            outside_guarantee: what touched data outside DP-SGD, and why it is not the private
                records (e.g. statistics of the held-out split).

        Returns:
            The section ``he_service.privacy.check_privacy`` verifies.

        Raises:
            PrivacyError: phases are missing, or the accountant counted other steps.
        """
        steps = sum(phase["steps"] for phase in self.phases)
        history = self._engine.accountant.history
        if len(self.phases) != len(self._planned) or steps != sum(h[2] for h in history):
            raise PrivacyError(
                f"the accountant saw {history}, the phases {self.phases}: not the plan"
            )
        budget, seed = self.budget, self.budget.noise_seed
        if seed is None:
            note = (
                "drawn from Python's secrets module and not recorded: the noise is secret, as "
                "the guarantee assumes"
            )
        else:
            note = (
                f"{seed}, published so that the tests rebuild this artifact bit for bit; anyone "
                "can regenerate the noise from it, so this artifact is a reproducible "
                "demonstration of the guarantee, not a deployable one. `he-models train NAME "
                "--dp-epsilon E` without --dp-noise-seed draws the seed from Python's secrets "
                "module and does not record it"
            )
        return {
            "mechanism": "DP-SGD: per-record gradient clipping, Gaussian noise, Poisson sampling",
            "library": f"opacus {opacus.__version__}",
            "epsilon": budget.epsilon,
            "delta": budget.delta,
            "accountant": ACCOUNTANT,
            "epsilon_spent": float(self._engine.accountant.get_epsilon(budget.delta)),
            "noise_multiplier": self.plan.noise_multiplier,
            "max_grad_norm": budget.max_grad_norm,
            "sample_rate": self.plan.sample_rate,
            "expected_batch_size": self.plan.expected_batch_size,
            "epochs": sum(phase["epochs"] for phase in self.phases),
            "steps": steps,
            "phases": list(self.phases),
            "dataset": dataset,
            "n_records": len(self._records),
            "unit": UNIT,
            "outside_guarantee": list(outside_guarantee),
            "noise_seed": seed,
            "noise_seed_note": note,
        }
