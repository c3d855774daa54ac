"""Load every artifact of a directory, compile it once, and serve its card."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_service.artifacts import ArtifactError, ModelArtifact, load_artifact
from he_service.engine import CompileError, EncryptedEvaluator, ParameterError, Plan, compile_plan
from he_service.protocol import CkksParams, ModelCard

__all__ = ["LoadedModel", "ModelRegistry", "RegistryError"]

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The models directory cannot be served as it is; the message names the artifact."""


@dataclass(frozen=True)
class LoadedModel:
    """An artifact with its compiled plan, its evaluator and its public card."""

    artifact: ModelArtifact
    plan: Plan
    evaluator: EncryptedEvaluator
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
            "poly_modulus_degree": self.plan.params.poly_modulus_degree,
        }


class ModelRegistry:
    """The served models, by name."""

    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self._models = dict(sorted(models.items()))

    @classmethod
    def from_directory(cls, root: Path, *, max_samples_per_request: int) -> ModelRegistry:
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
                plan = compile_plan(artifact)
            except (ArtifactError, CompileError, ParameterError) as exc:
                raise RegistryError(f"refusing to serve {path}: {exc}") from None
            models[artifact.name] = LoadedModel(
                artifact,
                plan,
                EncryptedEvaluator(plan),
                _card(artifact, plan, max_samples_per_request),
            )
            log.info("loaded model %s: %s", artifact.name, plan.summary()["steps"])
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
        if any(m.plan.params == params for m in self._models.values()):
            return None
        offered = sorted(
            {
                f"N={p.poly_modulus_degree} bits={list(p.coeff_modulus_bits)}"
                for p in (m.plan.params for m in self._models.values())
            }
        )
        return (
            "no served model uses these CKKS parameters; make keys with the parameters of "
            f"the model card (served: {'; '.join(offered)})"
        )


def _card(artifact: ModelArtifact, plan: Plan, max_samples: int) -> ModelCard:
    training = artifact.manifest.get("training", {})
    return ModelCard(
        name=artifact.name,
        description=artifact.description,
        input_shape=artifact.input_shape,
        preprocessing=artifact.preprocessing,
        labels=artifact.labels,
        ckks=plan.params,
        galois_steps=plan.galois_steps,
        input_encoding=plan.input_encoding,
        output_decoding=plan.output_decoding,
        max_samples_per_request=max_samples,
        details={"plan": plan.summary(), "training": training},
    )
