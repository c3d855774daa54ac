"""Service configuration: defaults, then ``HE_SERVICE_*`` environment variables, then a mapping."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_service.protocol.plans import PlanKind

__all__ = ["DEFAULT_MODELS_DIR", "Config"]

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "artifacts"
# Uploaded contexts survive restarts and are shared by the workers of one host.
DEFAULT_KEY_STORE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "he-service" / "contexts"
)


@dataclass(frozen=True)
class Config:
    """Every setting of the service, with safe defaults for a local quick start."""

    models_dir: Path = DEFAULT_MODELS_DIR
    max_predict_bytes: int = 16 << 20
    max_context_bytes: int = 128 << 20
    max_samples_per_request: int = 16
    # A batch request carries one ciphertext per input feature for every group of N/2 samples:
    # 784 ciphertexts (about 140 MB) for one full group of MNIST images.
    max_batch_samples: int = 8192
    max_batch_bytes: int = 512 << 20
    # A unit (one batch group) larger than one body is uploaded in parts of at most this size
    # (POST /v1/models/<name>/uploads), staged beside the contexts (disk or Redis) until the
    # client asks for the prediction. Bounds: bytes staged in all, open uploads per caller,
    # seconds an upload lives after its last part.
    max_part_bytes: int = 64 << 20
    uploads_max_bytes: int = 2 << 30
    uploads_per_owner: int = 4
    uploads_ttl_seconds: int = 900
    key_store_max_bytes: int = 4 << 30
    key_store_max_entries: int = 64
    key_store_ttl_seconds: int = 3600
    key_store_dir: Path = DEFAULT_KEY_STORE_DIR
    # redis://host:port/db: contexts (and quota counters) in Redis instead of key_store_dir.
    redis_url: str = ""
    # Deserialized contexts each worker keeps in memory, so a hot context is parsed once.
    key_cache_entries: int = 8
    # API tokens, off when empty: comma-separated ``name:sha256-hex-of-token`` (see
    # ``he-service hash-token``). With tokens, every route but health needs one, and a context
    # is visible only to the token that uploaded it.
    api_tokens: str = ""
    # Per token: requests per minute, and samples evaluated per budget period (an unlimited
    # query budget lets a client reconstruct the model: model extraction).
    rate_limit_per_minute: int = 600
    sample_budget: int = 1_000_000
    sample_budget_seconds: int = 86400
    # Bytes that decoding bodies and evaluating requests may hold at once in one worker
    # process (0: half the host's RAM or cgroup limit). Work that does not fit next to the
    # work in flight gets 503 + Retry-After, work larger than all of it 413; a model whose
    # compiled plans alone exceed it is refused at start.
    memory_budget_bytes: int = 0

    def memory_budget(self) -> int:
        """Return the process memory budget in bytes (``memory_budget_bytes``, or the default)."""
        from he_service.memory import default_budget_bytes

        return self.memory_budget_bytes or default_budget_bytes()

    def max_samples(self, kind: PlanKind) -> int:
        """Return the most samples one predict request of this plan kind may carry."""
        return {
            PlanKind.LATENCY: self.max_samples_per_request,
            PlanKind.BATCH: self.max_batch_samples,
        }[kind]

    def max_body_bytes(self, kind: PlanKind) -> int:
        """Return the largest predict body of this plan kind."""
        return {PlanKind.LATENCY: self.max_predict_bytes, PlanKind.BATCH: self.max_batch_bytes}[
            kind
        ]

    @property
    def max_any_body_bytes(self) -> int:
        """Return the largest body any route accepts (the HTTP servers' outer bound)."""
        return max(
            self.max_context_bytes,
            self.max_predict_bytes,
            self.max_batch_bytes,
            self.max_part_bytes,
        )

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Build the configuration: defaults -> ``HE_SERVICE_<FIELD>`` env vars -> overrides.

        Raises:
            ValueError: an unknown override key or a value of the wrong type.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            raw = environ.get(f"HE_SERVICE_{name.upper()}")
            if raw is not None:
                values[name] = raw
        unknown = sorted(set(overrides or {}) - set(fields))
        if unknown:
            raise ValueError(f"unknown configuration keys: {unknown}")
        values.update(overrides or {})
        converted: dict[str, Any] = {}
        kinds = {"Path": Path, "str": str, "int": int}
        for name, value in values.items():
            kind = kinds[str(fields[name].type)]
            try:
                converted[name] = kind(value)
            except (TypeError, ValueError):
                expected = {Path: "a path", str: "a string", int: "an integer"}[kind]
                raise ValueError(f"configuration {name}={value!r} is not {expected}") from None
            if kind is int and converted[name] <= 0:
                raise ValueError(f"configuration {name} must be positive, got {value!r}")
        return cls(**converted)
