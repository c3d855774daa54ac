"""The error every part of batch evaluation raises."""

from __future__ import annotations

from he_service.engine.evaluator import EvaluationError

__all__ = ["BatchEvaluationError"]


class BatchEvaluationError(EvaluationError):
    """Input ciphertexts or keys that do not fit the batch plan; the message says what to fix."""
