"""Compile models into CKKS evaluation plans and run them on ciphertexts."""

from he_service.engine.batch import BatchEvaluator, BatchPlan, compile_batch_plan
from he_service.engine.compiler import (
    DEFAULT_KEY_BUDGET_BYTES,
    CompileError,
    compile_plan,
    key_budget_of,
)
from he_service.engine.evaluator import EncryptedEvaluator, EvaluationError, Timings
from he_service.engine.model import CompiledModel, compile_model
from he_service.engine.params import ParameterError, max_depth_by_ring
from he_service.engine.plan import Plan
from he_service.engine.poly import (
    MAX_POLY_DEGREE,
    CubicStep,
    PolyStep,
    QuarticStep,
    SquareStep,
)
from he_service.engine.reference import forward_plain

__all__ = [
    "DEFAULT_KEY_BUDGET_BYTES",
    "MAX_POLY_DEGREE",
    "BatchEvaluator",
    "BatchPlan",
    "CompileError",
    "CompiledModel",
    "CubicStep",
    "EncryptedEvaluator",
    "EvaluationError",
    "ParameterError",
    "Plan",
    "PolyStep",
    "QuarticStep",
    "SquareStep",
    "Timings",
    "compile_batch_plan",
    "compile_model",
    "compile_plan",
    "forward_plain",
    "key_budget_of",
    "max_depth_by_ring",
]
