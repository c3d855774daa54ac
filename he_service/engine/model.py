"""What makes a model servable: one compile of both plans, used by export and the registry."""

from __future__ import annotations

from dataclasses import dataclass

from he_service.artifacts import ModelArtifact
from he_service.engine.batch import BatchPlan, compile_batch_plan
from he_service.engine.compiler import CompileError, compile_plan, key_budget_of
from he_service.engine.plan import Plan

__all__ = ["CompiledModel", "compile_model"]


@dataclass(frozen=True)
class CompiledModel:
    """Both plans of a model, compiled and checked against its key budget."""

    artifact: ModelArtifact
    latency: Plan
    batch: BatchPlan
    key_budget_bytes: int


def compile_model(artifact: ModelArtifact) -> CompiledModel:
    """Compile both plans of an artifact exactly as the server will serve them.

    Args:
        artifact: a model checked by ``load_artifact``.

    Returns:
        The compiled plans.

    Raises:
        CompileError: a layer the engine cannot evaluate, or public keys over the budget.
        ParameterError: the network is too deep or too wide for the largest ring.
    """
    budget = key_budget_of(artifact)
    latency = compile_plan(artifact, key_budget_bytes=budget)
    batch = compile_batch_plan(artifact)
    for kind, plan in (("latency", latency), ("batch", batch)):
        needed = plan.costs()["public_key_bytes"]
        if needed > budget:
            raise CompileError(
                f"the {kind} plan needs {needed / 2**20:.1f} MiB of public keys, over the "
                f"{budget / 2**20:.1f} MiB key budget; use fewer channels or lower-degree "
                "activations, or raise the budget (he-models convert --key-budget)"
            )
    return CompiledModel(artifact, latency, batch, budget)
