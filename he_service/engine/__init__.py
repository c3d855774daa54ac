"""Compile models into CKKS evaluation plans and run them on ciphertexts."""

from he_service.engine.batch import BatchEvaluator, BatchPlan, compile_batch_plan
from he_service.engine.compiler import CompileError, compile_plan
from he_service.engine.evaluator import EncryptedEvaluator, EvaluationError, Timings
from he_service.engine.model import DEFAULT_KEY_BUDGET_BYTES, CompiledModel, compile_model
from he_service.engine.params import ParameterError, choose_params
from he_service.engine.plan import (
    AffineStep,
    CubicStep,
    InputStep,
    Plan,
    PolyStep,
    QuarticStep,
    SquareStep,
)
from he_service.engine.reference import forward_plain

__all__ = [
    "DEFAULT_KEY_BUDGET_BYTES",
    "AffineStep",
    "BatchEvaluator",
    "BatchPlan",
    "CompileError",
    "CompiledModel",
    "CubicStep",
    "EncryptedEvaluator",
    "EvaluationError",
    "InputStep",
    "ParameterError",
    "Plan",
    "PolyStep",
    "QuarticStep",
    "SquareStep",
    "Timings",
    "choose_params",
    "compile_batch_plan",
    "compile_model",
    "compile_plan",
    "forward_plain",
]
