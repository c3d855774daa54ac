"""A compiled plan as the predict route sees it: units of ciphertexts in, ciphertexts out.

A *unit* is what one evaluation consumes: one sample's ciphertexts (latency plan) or one group
of up to ``slot_count`` samples, one ciphertext per input feature (batch plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import tenseal.sealapi as seal

from he_service.engine import BatchEvaluator, BatchPlan, EncryptedEvaluator, Plan, Timings
from he_service.protocol import CkksParams, PlanCard

__all__ = ["BatchServing", "LatencyServing", "ServedPlan"]


class ServedPlan(Protocol):
    """What the predict route needs from a plan."""

    @property
    def params(self) -> CkksParams: ...

    @property
    def galois_steps(self) -> tuple[int, ...]: ...

    @property
    def inputs_per_unit(self) -> int: ...

    @property
    def samples_per_unit(self) -> int: ...

    @property
    def context(self) -> seal.SEALContext: ...

    def check(self, cts: list[seal.Ciphertext]) -> None:
        """Raise EvaluationError (or a subclass of ValueError) for a bad unit."""

    def evaluate(
        self,
        cts: list[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> list[seal.Ciphertext]:
        """Evaluate one checked unit."""

    def card(self, max_samples: int) -> PlanCard:
        """Describe the plan to clients."""


@dataclass
class LatencyServing:
    """One sample per unit: the plan's input ciphertexts in, one ciphertext out."""

    plan: Plan
    evaluator: EncryptedEvaluator

    @classmethod
    def build(cls, plan: Plan) -> LatencyServing:
        return cls(plan, EncryptedEvaluator(plan))

    @property
    def params(self) -> CkksParams:
        return self.plan.params

    @property
    def galois_steps(self) -> tuple[int, ...]:
        return self.plan.galois_steps

    @property
    def inputs_per_unit(self) -> int:
        return self.plan.input_ciphertexts

    @property
    def samples_per_unit(self) -> int:
        return 1

    @property
    def context(self) -> seal.SEALContext:
        return self.evaluator.context

    def check(self, cts: list[seal.Ciphertext]) -> None:
        self.evaluator.check_inputs(cts)

    def evaluate(
        self,
        cts: list[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> list[seal.Ciphertext]:
        return [self.evaluator.evaluate(cts, relin_keys, galois_keys, timings)]

    def card(self, max_samples: int) -> PlanCard:
        return PlanCard(
            ckks=self.plan.params,
            galois_steps=self.plan.galois_steps,
            input_encoding=self.plan.input_encoding,
            output_decoding=self.plan.output_decoding,
            max_samples_per_request=max_samples,
            details=self.plan.summary(),
        )


@dataclass
class BatchServing:
    """Up to ``slot_count`` samples per unit: one ciphertext per feature in, one per output out."""

    plan: BatchPlan
    evaluator: BatchEvaluator

    @classmethod
    def build(cls, plan: BatchPlan) -> BatchServing:
        return cls(plan, BatchEvaluator(plan))

    @property
    def params(self) -> CkksParams:
        return self.plan.params

    @property
    def galois_steps(self) -> tuple[int, ...]:
        return ()

    @property
    def inputs_per_unit(self) -> int:
        return self.plan.input_length

    @property
    def samples_per_unit(self) -> int:
        return self.plan.slot_count

    @property
    def context(self) -> seal.SEALContext:
        return self.evaluator.context

    def check(self, cts: list[seal.Ciphertext]) -> None:
        self.evaluator.check_inputs(cts)

    def evaluate(
        self,
        cts: list[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> list[seal.Ciphertext]:
        return self.evaluator.evaluate(cts, relin_keys, timings)

    def card(self, max_samples: int) -> PlanCard:
        return PlanCard(
            ckks=self.plan.params,
            galois_steps=(),
            input_encoding={
                "kind": "batch",
                "features": self.plan.input_length,
                "slot_count": self.plan.slot_count,
            },
            output_decoding={"kind": "batch", "outputs": self.plan.output_length},
            max_samples_per_request=max_samples,
            details=self.plan.summary(),
        )
