"""Load every artifact of a directory, compile it once, and serve its card."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_service.artifacts import ArtifactError, ModelArtifact, load_artifact
from he_service.engine import CompileError, ParameterError, compile_model
from he_service.protocol import CkksParams, ModelCard
from he_service.serving import ServedPlan, serve_batch, serve_latency

__all__ = ["LoadedModel", "ModelRegistry", "RegistryError"]

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The models directory cannot be served as it is; the message names the artifact."""


@dataclass(frozen=True)
class LoadedModel:
    """An artifact with its compiled plans (evaluators ready) and its public card."""

    artifact: ModelArtifact
    plans: dict[str, ServedPlan]
    card: ModelCard

    @property
    def name(self) -> str:
        return self.artifact.name

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.artifact.description,
            "input_shape": list(self.artifact.input_shape),
            "labels": list(self.artifact.labels),
            "plans": sorted(self.plans),
        }


class ModelRegistry:
    """The served models, by name."""

    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self._models = dict(sorted(models.items()))

    @classmethod
    def from_directory(cls, root: Path, *, max_samples: Mapping[str, int]) -> ModelRegistry:
        """Load, check and compile every artifact directory under ``root``.

        Raises:
            RegistryError: the directory is missing, empty, or holds a bad artifact.
        """
        if not root.is_dir():
            raise RegistryError(f"models directory {root} does not exist")
        models: dict[str, LoadedModel] = {}
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                artifact = load_artifact(path)
                compiled = compile_model(artifact)
                plans: dict[str, ServedPlan] = {
                    "latency": serve_latency(compiled.latency),
                    "batch": serve_batch(compiled.batch),
                }
            except (ArtifactError, CompileError, ParameterError) as exc:
                raise RegistryError(f"refusing to serve {path}: {exc}") from None
            models[artifact.name] = LoadedModel(
                artifact, plans, _card(artifact, plans, max_samples)
            )
            log.info("loaded model %s with plans %s", artifact.name, sorted(plans))
        if not models:
            raise RegistryError(f"no model artifacts in {root}; build one with `he-models train`")
        return cls(models)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

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


def _card(
    artifact: ModelArtifact, plans: Mapping[str, ServedPlan], max_samples: Mapping[str, int]
) -> ModelCard:
    return ModelCard(
        name=artifact.name,
        description=artifact.description,
        input_shape=artifact.input_shape,
        preprocessing=artifact.preprocessing,
        labels=artifact.labels,
        plans={kind: plan.card(max_samples[kind]) for kind, plan in plans.items()},
        details={"training": artifact.manifest.get("training", {})},
    )
