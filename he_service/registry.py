"""Load every artifact of a directory, compile it once, and serve its card.

An artifact the service cannot serve (bad manifest, engine refusal, over the key budget, a
request that cannot fit the server's limits) is *refused*: logged once with the reason,
reported by health and the model list, answered with 404 and the reason; the others are
served. Only a directory where nothing is servable stops the service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_service.artifacts import ArtifactError, ModelArtifact, load_artifact
from he_service.config import Config
from he_service.engine import CompiledModel, CompileError, ParameterError, compile_model
from he_service.memory import MemoryBudget
from he_service.privacy import privacy_card
from he_service.protocol import (
    CkksParams,
    ModelCard,
    OutputRanges,
    PlanKind,
    ProtocolError,
    Task,
    read_output_ranges,
)
from he_service.serving import PlanRefused, ServedPlan, resident_bytes, serve_plans

__all__ = ["LoadedModel", "ModelRegistry", "ModelUnavailable", "RegistryError"]

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The models directory cannot be served as it is; the message names the artifacts."""


class ModelUnavailable(LookupError):
    """No served model has this name; ``reason`` says why when the model was refused."""

    def __init__(self, name: str, known: list[str], reason: str | None = None) -> None:
        super().__init__(name)
        self.name, self.known, self.reason = name, known, reason


@dataclass(frozen=True)
class LoadedModel:
    """An artifact with its compiled plans (evaluators ready) and its public card."""

    artifact: ModelArtifact
    plans: dict[PlanKind, ServedPlan]
    card: ModelCard

    @property
    def name(self) -> str:
        return self.artifact.name

    def plan(self, kind: str | None) -> ServedPlan:
        """Return the plan a request names (``None``: latency).

        Raises:
            ProtocolError: the model offers no plan of that name.
        """
        wanted = PlanKind.LATENCY.value if kind is None else kind
        plan = next((plan for key, plan in self.plans.items() if key == wanted), None)
        if plan is None:
            shown = kind if kind is None or len(kind) <= 40 else kind[:40] + "…"
            offered = sorted(k.value for k in self.plans)
            raise ProtocolError(f"model {self.name!r} offers plans {offered}, not {shown!r}")
        return plan

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.artifact.description,
            "input_shape": list(self.artifact.input_shape),
            "task": self.card.task.value,
            "labels": list(self.artifact.labels),
            "plans": sorted(k.value for k in self.plans),
        }


class ModelRegistry:
    """The served models by name, and the refused ones with their reasons."""

    def __init__(self, models: dict[str, LoadedModel], refused: dict[str, str]) -> None:
        self._models = dict(sorted(models.items()))
        self.refused = dict(sorted(refused.items()))

    @classmethod
    def from_directory(
        cls, root: Path, config: Config, budget: MemoryBudget | None = None
    ) -> ModelRegistry:
        """Load, check and compile every artifact directory under ``root``.

        A model whose compiled plans would not fit what is left of the memory budget is
        refused (before its weights are encoded), and the others are served.

        Args:
            root: the models directory (one artifact per subdirectory).
            config: the server's limits, which the plans' request sizes must fit.
            budget: the process memory budget; served models hold their estimated resident
                memory from it for good (default: a new one of ``config.memory_budget()``).

        Returns:
            The registry: every servable model, and the reason each other one was refused.

        Raises:
            RegistryError: the directory is missing or holds no servable artifact.
        """
        if not root.is_dir():
            raise RegistryError(f"models directory {root} does not exist")
        budget = MemoryBudget(config.memory_budget()) if budget is None else budget
        models: dict[str, LoadedModel] = {}
        refused: dict[str, str] = {}
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                artifact = load_artifact(path)
                compiled = compile_model(artifact)
                needed = _claim(budget, compiled)
                try:
                    plans = serve_plans(compiled, config)
                    card = _card(artifact, plans)
                except BaseException:
                    budget.release(needed)
                    raise
            except (ArtifactError, CompileError, ParameterError, PlanRefused, ProtocolError) as exc:
                # Health is public: name the artifact's files relative to the models directory.
                reason = " ".join(str(exc).replace(f"{root}/", "").split())
                refused[path.name] = reason
                log.warning("refusing to serve model %s: %s", path.name, reason)
                continue
            models[artifact.name] = LoadedModel(artifact, plans, card)
            log.info("loaded model %s with plans %s", artifact.name, sorted(plans))
        if not models:
            if not refused:
                raise RegistryError(
                    f"no model artifacts in {root}; build one with `he-models train`"
                )
            reasons = "; ".join(f"{name}: {reason}" for name, reason in sorted(refused.items()))
            raise RegistryError(f"no servable model in {root}: {reasons}")
        return cls(models, refused)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def model(self, name: str) -> LoadedModel:
        """Return a served model.

        Raises:
            ModelUnavailable: no such model, or it was refused (with the reason).
        """
        model = self._models.get(name)
        if model is None:
            raise ModelUnavailable(name, self.names(), self.refused.get(name))
        return model

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def max_galois_keys(self, params: CkksParams) -> int:
        """Return how many Galois keys a context of these parameters can use here: the
        distinct rotation steps of the served plans that use them."""
        steps = {
            step
            for m in self._models.values()
            for p in m.plans.values()
            if p.params == params
            for step in p.galois_steps
        }
        return len(steps)

    def accepts(self, params: CkksParams) -> str | None:
        """Return None if some model uses these parameters, else why the context is useless."""
        served = [p.params for m in self._models.values() for p in m.plans.values()]
        if params in served:
            return None
        offered = sorted(
            {f"N={p.poly_modulus_degree} bits={list(p.coeff_modulus_bits)}" for p in served}
        )
        return (
            "no served model uses these CKKS parameters; make keys with the parameters of "
            f"the model card (served: {'; '.join(offered)})"
        )


def _claim(budget: MemoryBudget, compiled: CompiledModel) -> int:
    """Hold the model's resident memory from the budget and return it, or refuse the model.

    Raises:
        PlanRefused: the compiled plans do not fit what the served models left of the budget.
    """
    needed = resident_bytes(compiled)
    free = budget.free
    if not budget.claim(needed):
        raise PlanRefused(
            f"its compiled plans need about {needed >> 20} MiB of memory and only {free >> 20} "
            f"MiB of the {budget.capacity >> 20} MiB memory budget are left "
            "(memory_budget_bytes); serve it from a server with fewer models or more memory"
        )
    return needed


def _card(artifact: ModelArtifact, plans: dict[PlanKind, ServedPlan]) -> ModelCard:
    return ModelCard(
        name=artifact.name,
        description=artifact.description,
        input_shape=artifact.input_shape,
        preprocessing=artifact.preprocessing,
        # Artifacts without a task (format 2 and older) are classifiers.
        task=Task.parse(getattr(artifact, "task", Task.CLASSIFICATION.value)),
        labels=artifact.labels,
        plans={kind: plan.card() for kind, plan in plans.items()},
        output_ranges=_output_ranges(artifact),
        details={
            "training": artifact.manifest.get("training", {}),
            # Checked by load_artifact; a model without the section says it has no guarantee.
            "privacy": privacy_card(artifact.manifest.get("privacy")),
        },
    )


def _output_ranges(artifact: ModelArtifact) -> OutputRanges | None:
    """Return the calibrated output ranges the manifest records, if any.

    Raises:
        ProtocolError: the manifest records them malformed.
    """
    bound = artifact.manifest.get("conversion", {}).get("output_bound", {})
    ranges = bound.get("output_ranges") if isinstance(bound, dict) else None
    where = f"{artifact.name}: conversion.output_bound.output_ranges"
    return read_output_ranges(ranges, len(artifact.labels), where)
