"""Shared pieces of the benchmarks: served plans, client sessions, held-out data, medians.

Speed targets are ratios of two pipelines measured in the same run (never absolute times):
every benchmark records its median in ``Measurements`` and a benchmark that has a target
compares itself with a reference measured earlier in the session (``conftest.py`` runs the
modules in the order baseline -> latency -> batch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flask import Flask
from pytest_benchmark.fixture import BenchmarkFixture

from clients import HEClient, ModelSession
from he_service.artifacts import ModelArtifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.keystore import StoredContext
from he_service.protocol import preprocess
from he_service.serving import ServedPlan

# The TenSEAL tutorial baseline runs this model's weights; its targets are checked on it.
BASELINE_MODEL = "mnist-cnn"
BASELINE_PLAN = "tenseal-tutorial"


def shipped_models() -> list[str]:
    return sorted(p.name for p in DEFAULT_MODELS_DIR.iterdir() if (p / "manifest.json").is_file())


class Served:
    """The app's compiled plans and stored keys, to time evaluation without HTTP."""

    def __init__(self, app: Flask) -> None:
        self._service = app.extensions["he_service"]

    def plan(self, model: str, plan: str) -> ServedPlan:
        """Return a served plan, skipping the benchmark if the model does not offer it."""
        loaded = self._service.registry.get(model)
        assert loaded is not None, f"model {model} is not served"
        if plan not in loaded.plans:
            pytest.skip(f"model {model} offers plans {sorted(loaded.plans)}; no {plan!r} plan yet")
        served: ServedPlan = loaded.plans[plan]
        return served

    def artifact(self, model: str) -> ModelArtifact:
        loaded = self._service.registry.get(model)
        assert loaded is not None, f"model {model} is not served"
        return loaded.artifact

    def keys(self, context_id: str) -> StoredContext:
        # Benchmarks run without API tokens: every context belongs to the anonymous caller.
        stored: StoredContext | None = self._service.store.get("anonymous", context_id)
        assert stored is not None, f"context {context_id[:12]} is not stored"
        return stored


class Sessions:
    """One client session (keys generated, public context uploaded) per model and plan."""

    def __init__(self, client: HEClient, served: Served) -> None:
        self._client, self._served = client, served
        self._sessions: dict[tuple[str, str], ModelSession] = {}

    def get(self, model: str, plan: str = "latency") -> ModelSession:
        self._served.plan(model, plan)  # skips if the plan is not served
        if (model, plan) not in self._sessions:
            self._sessions[model, plan] = self._client.model(model, plan=plan)
        return self._sessions[model, plan]


class HeldOut:
    """Held-out samples of each shipped model (its recipe's test split) and plain outputs."""

    def __init__(self, served: Served) -> None:
        self._served = served
        self._raw: dict[str, np.ndarray] = {}

    def raw(self, model: str) -> np.ndarray:
        """Return the raw (not preprocessed) test samples the model was evaluated on."""
        if model not in self._raw:
            from models.recipes import get_recipe  # torch: imported only when needed

            artifact = self._served.artifact(model)
            split_seed = int(artifact.manifest.get("training", {}).get("split_seed", 0))
            self._raw[model] = np.asarray(get_recipe(model).load_split(split_seed).x_test)
        return self._raw[model]

    def preprocessed(self, model: str, raw: np.ndarray) -> np.ndarray:
        """Return raw samples preprocessed as the card says, shape (n, *input_shape)."""
        artifact = self._served.artifact(model)
        return np.stack([preprocess(x, artifact.preprocessing, artifact.input_shape) for x in raw])

    def expected(self, model: str, raw: np.ndarray) -> np.ndarray:
        """Return ``forward_plain`` outputs of raw samples, shape (n, outputs)."""
        artifact = self._served.artifact(model)
        return np.stack([forward_plain(artifact, x) for x in self.preprocessed(model, raw)])


Key = tuple[str, str, str]  # (model, plan, stage)


@dataclass
class Measurements:
    """Medians of this session's benchmarks, for same-run ratios."""

    per_sample: dict[Key, float] = field(default_factory=dict)

    def record(
        self,
        benchmark: BenchmarkFixture,
        *,
        model: str,
        plan: str,
        stage: str,
        samples: int = 1,
        **info: Any,
    ) -> float:
        """Tag the benchmark for the report and remember its median seconds per sample."""
        assert benchmark.stats is not None, "record() after the benchmark has run"
        median = float(benchmark.stats.stats.median)
        benchmark.extra_info.update(model=model, plan=plan, stage=stage, samples=samples, **info)
        benchmark.extra_info["seconds_per_sample"] = median / samples
        self.per_sample[model, plan, stage] = median / samples
        return median

    def target(
        self,
        benchmark: BenchmarkFixture,
        name: str,
        *,
        reference: Key,
        subject: Key,
        at_least: float,
    ) -> None:
        """Assert ``reference / subject >= at_least`` (seconds per sample, this session).

        A reference that did not run in this session (deselected) is reported as a warning;
        the target is then unchecked, and says so in ``extra_info["targets"]``.
        """
        targets = benchmark.extra_info.setdefault("targets", {})
        entry: dict[str, Any] = {
            "reference": "/".join(reference),
            "subject": "/".join(subject),
            "at_least": at_least,
            "ratio": None,
            "passed": None,
        }
        targets[name] = entry
        if reference not in self.per_sample or subject not in self.per_sample:
            warnings.warn(
                f"target {name!r} not checked: run {'/'.join(reference)} and "
                f"{'/'.join(subject)} in the same session",
                stacklevel=2,
            )
            return
        ratio = self.per_sample[reference] / self.per_sample[subject]
        entry.update(ratio=ratio, passed=ratio >= at_least)
        assert ratio >= at_least, (
            f"{name}: {'/'.join(reference)} takes {ratio:.1f}x the time of "
            f"{'/'.join(subject)}; the target is at least {at_least}x"
        )

    @staticmethod
    def goal(benchmark: BenchmarkFixture, name: str, value: float, at_most: float) -> None:
        """Record a goal in absolute units (not asserted: absolute times depend on the machine)."""
        targets = benchmark.extra_info.setdefault("targets", {})
        targets[name] = {"value": value, "at_most": at_most, "passed": value <= at_most}
