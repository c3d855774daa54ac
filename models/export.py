"""Write model artifacts (``manifest.json`` + ``weights.npz``) byte-for-byte reproducibly.

Layout: ``<out_dir>/<name>/manifest.json`` and ``<out_dir>/<name>/weights.npz``. The manifest
schema is the contract with ``he_service.artifacts.load_artifact``; the exporter runs that
loader on every artifact before it is moved into place.

Reproducibility rules: ``np.savez`` stamps the current time into the zip, so the zip is written
here with fixed metadata; the manifest holds no timestamps, host names or paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from he_service.artifacts import FORMAT, FORMAT_VERSION, ArtifactError, load_artifact
from he_service.engine import CompiledModel, CompileError, ParameterError, compile_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ExportError",
    "ExportResult",
    "export_artifact",
    "manifest_bytes",
    "npz_bytes",
    "plan_lines",
    "state_arrays",
    "torch_release",
]

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"

# The earliest date a zip header can hold; any fixed value works, this one is conventional.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Artifact names become directory names and URL path segments on the server.
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class ExportError(RuntimeError):
    """An artifact could not be written or failed its self-check; nothing was replaced."""


@dataclass(frozen=True)
class ExportResult:
    """Where an artifact was written, the sha256 of its weights file, and its compiled plans.

    ``compiled`` is what the server will serve (``he_service.engine.compile_model`` on the
    written files); its plans' summaries are what the model card states.
    """

    path: Path
    weights_sha256: str
    compiled: CompiledModel


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def plan_lines(compiled: CompiledModel) -> list[str]:
    """Describe each plan as its model card will: ring, primes, depth, keys, bytes, rotations.

    Args:
        compiled: the compiled model.

    Returns:
        One line per plan (latency, then batch), then the key budget.
    """
    lines = []
    for kind, plan in (("latency", compiled.latency), ("batch", compiled.batch)):
        summary = plan.summary()
        bits = plan.params.coeff_modulus_bits
        if kind == "latency":
            request = f"request {_size(summary['request_bytes_per_sample'])} per sample"
        else:
            request = (
                f"request {_size(summary['request_bytes_per_group'])} per group of "
                f"{summary['samples_per_request']} samples"
            )
        line = (
            f"{kind} plan: N={plan.params.poly_modulus_degree}, primes {list(bits[:-1])} + "
            f"{bits[-1]}-bit special, depth {summary['depth']}; public keys "
            f"{_size(summary['public_key_bytes'])} ({summary['public_key_bytes']} bytes, "
            # The batch plan rotates nothing, so its summary lists no Galois keys.
            f"{summary.get('galois_keys', 0)} Galois keys), {summary['rotations']} rotations; "
            f"{request}"
        )
        if "expected_max_logit_error" in summary:
            line += f"; expected max |logit error| {summary['expected_max_logit_error']:.3g}"
        lines.append(line)
    lines.append(
        f"key budget {_size(compiled.key_budget_bytes)} ({compiled.key_budget_bytes} bytes) "
        "per plan"
    )
    return lines


def torch_release() -> str:
    """Return the torch release for a manifest's provenance, e.g. ``2.13.0``.

    "2.13.0+cpu" and "2.13.0+cu121" are the same release; the local tag would make the
    manifest differ between otherwise identical installs.
    """
    import torch

    return torch.__version__.split("+", 1)[0]


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy a model's parameters and buffers into float64 C-order little-endian arrays.

    Args:
        model: a torch module; its ``state_dict`` keys (e.g. ``conv1.weight``) become the
            array names.

    Returns:
        Arrays in ``state_dict`` order, detached from the model.
    """
    return {
        key: np.ascontiguousarray(value.detach().cpu().numpy(), dtype="<f8")
        for key, value in model.state_dict().items()
    }


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise arrays as an ``.npz`` whose bytes depend only on the arrays.

    Args:
        arrays: name -> array; names must not contain ``/``; object arrays are refused.

    Returns:
        The bytes of an uncompressed zip that ``np.load(..., allow_pickle=False)`` reads.

    Raises:
        ValueError: for an unusable name or an array that would need pickle.
    """
    buffer = io.BytesIO()
    # ZIP_STORED: no compressor version can change the bytes, and float noise barely compresses.
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"array name {name!r} cannot be an npz member")
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            # ZipInfo defaults these from the running OS; pin them so Windows writes the same bytes.
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            archive.writestr(info, payload.getvalue())
    return buffer.getvalue()


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """Serialise a manifest canonically: sorted keys, 2-space indent, trailing newline.

    Args:
        manifest: a JSON-compatible mapping.

    Returns:
        UTF-8 bytes.

    Raises:
        ValueError: if the manifest holds NaN or infinity, which JSON cannot represent.
    """
    text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _self_check(artifact_dir: Path, arrays: Mapping[str, np.ndarray]) -> CompiledModel:
    with np.load(artifact_dir / WEIGHTS_FILE, allow_pickle=False) as npz:
        if list(npz.files) != list(arrays):
            raise ExportError(f"weights.npz holds {npz.files}, expected {list(arrays)}")
        for key, array in arrays.items():
            if not np.array_equal(npz[key], array):
                raise ExportError(f"weights.npz array {key!r} does not read back identically")
    # The server's own validator and compiler: an artifact it would refuse must never ship.
    try:
        artifact = load_artifact(artifact_dir)
    except ArtifactError as exc:
        raise ExportError(f"the server would refuse this artifact: {exc}") from exc
    try:
        return compile_model(artifact)
    except ParameterError as exc:
        raise ExportError(f"the engine cannot run this network: {exc}") from exc
    except CompileError as exc:
        raise ExportError(f"the engine cannot compile this network: {exc}") from exc


def export_artifact(
    out_dir: str | Path,
    name: str,
    arrays: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
) -> ExportResult:
    """Write ``<out_dir>/<name>/{manifest.json,weights.npz}``, replacing any previous version.

    Files are written and checked in a temporary directory inside ``out_dir`` (read back, then
    ``he_service.artifacts.load_artifact`` and ``he_service.engine.compile_model``, exactly what
    the server runs) and then renamed into place, so a failure leaves either the old artifact
    or none, never a partial one. (Replacing an existing directory takes two renames; a reader
    in between sees no artifact, not a broken one.)

    Args:
        out_dir: parent directory; created if missing.
        name: artifact name, which is also the directory name (``[a-z0-9-]``, at most 64).
        arrays: weights by name; stored as float64 C-order.
        manifest: the manifest without its ``weights`` entry, which is added here from the
            written file; its ``name`` must equal ``name``.

    Returns:
        The artifact directory, the sha256 of ``weights.npz`` and the compiled plans.

    Raises:
        ValueError: for a bad name or a manifest whose name differs or that already has
            ``weights``.
        ExportError: if the written artifact fails its self-check, or the server would
            refuse or could not compile it (e.g. too deep for any ring).
        OSError: if the files cannot be written.
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"artifact name {name!r} must match {_NAME_PATTERN.pattern}")
    if manifest.get("name") != name:
        raise ValueError(f"manifest name {manifest.get('name')!r} differs from {name!r}")
    if "weights" in manifest:
        raise ValueError("manifest must not contain 'weights'; export_artifact fills it in")

    stored = {key: np.ascontiguousarray(value, dtype="<f8") for key, value in arrays.items()}
    weights = npz_bytes(stored)
    digest = hashlib.sha256(weights).hexdigest()
    full_manifest = {**manifest, "weights": {"file": WEIGHTS_FILE, "sha256": digest}}
    manifest_data = manifest_bytes(full_manifest)

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory")
    # Same file system as the target, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        # Named like the target because the loader checks manifest name == directory name.
        fresh = staging / name
        fresh.mkdir()
        (fresh / WEIGHTS_FILE).write_bytes(weights)
        (fresh / MANIFEST_FILE).write_bytes(manifest_data)
        compiled = _self_check(fresh, stored)
        if target.exists():
            previous = staging / ".previous"
            target.rename(previous)
            try:
                fresh.rename(target)
            except OSError:
                previous.rename(target)
                raise
        else:
            fresh.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(path=target, weights_sha256=digest, compiled=compiled)
