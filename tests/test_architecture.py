"""Dependency rules of DESIGN.md and the pinned public APIs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import clients
import he_service.engine
import he_service.protocol

_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('forbidden import: ' + name)
sys.meta_path.insert(0, Block())
import {module}
"""


@pytest.mark.parametrize(
    ("module", "blocked"),
    [
        # Dask is optional: imported only when a run asks for a cluster (--dask).
        ("clients", {"flask", "torch", "werkzeug", "waitress", "dask", "distributed"}),
        ("clients.cli", {"flask", "torch", "werkzeug", "waitress", "dask", "distributed"}),
        ("he_service.protocol", {"flask", "torch", "httpx"}),
        ("he_service.app", {"torch", "opacus"}),
        ("he_service.cli", {"torch", "opacus"}),
    ],
)
def test_dependency_rules(module: str, blocked: set[str]) -> None:
    code = _BLOCK.format(blocked=sorted(blocked), module=module)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_server_app_really_loads_without_torch() -> None:
    # The shipped DP models' claims are checked at load with dp-accounting, not Opacus.
    code = _BLOCK.format(blocked=["opacus", "torch"], module="he_service.app") + (
        "\nfrom he_service import create_app\ncreate_app()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_public_apis_are_pinned() -> None:
    assert sorted(clients.__all__) == sorted(
        [
            "AuthenticationError",
            "BadRequestError",
            "ContextNotFoundError",
            "DaskClusterError",
            "HEClient",
            "HEClientError",
            "KeySet",
            "KeysTooLargeError",
            "ModelNotFoundError",
            "ModelSession",
            "NotFoundError",
            "OutOfRangeWarning",
            "Outputs",
            "ParameterMismatchError",
            "PayloadTooLargeError",
            "RateLimitedError",
            "Retry",
            "ScoredGroup",
            "ServerError",
            "ServiceUnavailableError",
            "TransportError",
        ]
    )
    assert sorted(he_service.protocol.__all__) == sorted(
        [
            "CARD_VERSION",
            "CONTEXT_HEADER",
            "MEDIA_TYPE",
            "BatchDecoding",
            "BatchEncoding",
            "Buffer",
            "CkksParams",
            "GatherEncoding",
            "KeyBundle",
            "ModelCard",
            "OutputRanges",
            "PlanCard",
            "PlanCosts",
            "PlanKind",
            "PlanLimits",
            "PrefixDecoding",
            "ProtocolError",
            "Task",
            "decode_batch",
            "decode_frames",
            "decode_key_bundle",
            "decode_output",
            "encode_batch",
            "encode_frames",
            "encode_input",
            "encode_key_bundle",
            "frame_parts",
            "framed_size",
            "galois_element",
            "load_seal",
            "output_step",
            "preprocess",
            "preprocess_rows",
            "read_frames",
            "read_output_ranges",
            "rows_out_of_range",
            "save_seal",
            "save_seeded",
            "seal_context",
        ]
    )
    assert sorted(he_service.engine.__all__) == sorted(
        [
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
    )
    for module in (clients, he_service.protocol, he_service.engine):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
