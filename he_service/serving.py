"""A compiled plan as the predict route sees it: units of ciphertexts in, ciphertexts out.

A *unit* is what one evaluation consumes: one sample's ciphertexts (latency plan) or one group
of up to ``slot_count`` samples, one ciphertext per input feature (batch plan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tenseal.sealapi as seal

from he_service.engine import BatchEvaluator, BatchPlan, EncryptedEvaluator, Plan, Timings
from he_service.protocol import CkksParams, PlanCard

__all__ = ["ServedPlan", "serve_batch", "serve_latency"]

Ciphertexts = list[seal.Ciphertext]


@dataclass(frozen=True)
class ServedPlan:
    """What the predict route needs from a plan, whatever its kind."""

    params: CkksParams
    galois_steps: tuple[int, ...]
    inputs_per_unit: int
    samples_per_unit: int
    context: seal.SEALContext
    check: Callable[[Ciphertexts], None]  # raises EvaluationError for a bad unit
    evaluate: Callable[[Ciphertexts, seal.RelinKeys, seal.GaloisKeys | None, Timings], Ciphertexts]
    card: Callable[[int], PlanCard]  # the plan's card for a per-request sample limit


def serve_latency(plan: Plan) -> ServedPlan:
    """One sample per unit: the plan's input ciphertexts in, one ciphertext out."""
    evaluator = EncryptedEvaluator(plan)

    def evaluate(
        cts: Ciphertexts, relin: seal.RelinKeys, galois: seal.GaloisKeys | None, t: Timings
    ) -> Ciphertexts:
        return [evaluator.evaluate(cts, relin, galois, t)]

    def card(max_samples: int) -> PlanCard:
        return PlanCard(
            ckks=plan.params,
            galois_steps=plan.galois_steps,
            input_encoding=plan.input_encoding,
            output_decoding=plan.output_decoding,
            max_samples_per_request=max_samples,
            details=plan.summary(),
        )

    return ServedPlan(
        plan.params,
        plan.galois_steps,
        plan.input_ciphertexts,
        1,
        evaluator.context,
        evaluator.check_inputs,
        evaluate,
        card,
    )


def serve_batch(plan: BatchPlan) -> ServedPlan:
    """Up to ``slot_count`` samples per unit: one ciphertext per feature in, one per output out."""
    evaluator = BatchEvaluator(plan)

    def evaluate(
        cts: Ciphertexts, relin: seal.RelinKeys, galois: seal.GaloisKeys | None, t: Timings
    ) -> Ciphertexts:
        return evaluator.evaluate(cts, relin, t)  # no rotations: Galois keys are never used

    def card(max_samples: int) -> PlanCard:
        return PlanCard(
            ckks=plan.params,
            galois_steps=(),
            input_encoding={
                "kind": "batch",
                "features": plan.input_length,
                "slot_count": plan.slot_count,
            },
            output_decoding={"kind": "batch", "outputs": plan.output_length},
            max_samples_per_request=max_samples,
            details=plan.summary(),
        )

    return ServedPlan(
        plan.params,
        (),
        plan.input_length,
        plan.slot_count,
        evaluator.context,
        evaluator.check_inputs,
        evaluate,
        card,
    )
