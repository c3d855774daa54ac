"""The batch plan (throughput mode): one sample per CKKS slot, no rotations, no Galois keys.

A request for up to ``N/2`` samples is one ciphertext per input feature (slot ``j`` of
ciphertext ``f`` holds feature ``f`` of sample ``j``); the answer is one ciphertext per model
output. Every affine map is then a sum of ciphertext-times-scalar terms and every activation an
element-wise polynomial. Only relinearization keys are needed.

Why it is fast (mnist-cnn, 4096 images: 1.05-1.3 s on 2 cores, about 0.3 ms per image):

* **Integer weights, evaluated as matrix products.** Layer ``k``'s weights are rounded to
  integers ``round(w * s_k)`` (``s_k`` gives ``weight_bits`` of precision relative to the
  largest weight). A ciphertext times an integer is modular arithmetic on its RNS limbs (in
  NTT form a constant is the same number in every coefficient), so a whole layer is an integer
  matrix product modulo each prime. It runs as float64 BLAS products on both cores and is
  exact: coefficients are cut into chunks of at most 32 bits so that no product reaches 2^53,
  and the chunks are put back together modulo the prime. The result is bit-identical to SEAL's
  ``multiply_plain`` + ``add`` with scalar plaintexts (the ``"seal"`` backend, kept as the
  reference and fallback), about 15x faster. Zero weights are skipped: sparse layers (a conv)
  become a few dense blocks over contiguous column bands.
* **Lazy rescaling.** Scales grow through an affine map and the following activation; primes
  are dropped only after the next affine map, where there are fewer ciphertexts, as many as
  bring the scale back to ``2^scale_bits``. mnist-cnn needs 4 data primes.
* **Deferred relinearization.** An activation's square is left at three polynomials; the next
  affine map works on those, so only its (fewer) outputs are relinearized (mnist-cnn: 64 + 10
  instead of 256 + 64), between their rescales.

The affine maps read and write SEAL's ciphertext memory through numpy views (``_raw_view``);
the layout is checked against SEAL's own serialization once per process and against each
ciphertext's metadata on every view. If that check fails the evaluator uses SEAL calls.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tenseal.sealapi as seal

from he_service.artifacts import ModelArtifact
from he_service.engine.compiler import CompileError, normalise
from he_service.engine.evaluator import EvaluationError, Timings
from he_service.engine.params import OUTPUT_HEADROOM_BITS
from he_service.engine.plan import CubicStep, PolyStep, QuarticStep, SquareStep
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams, seal_context

__all__ = [
    "BatchAffine",
    "BatchEvaluationError",
    "BatchEvaluator",
    "BatchPlan",
    "BatchPoly",
    "compile_batch_plan",
    "raw_access_available",
]

_log = logging.getLogger(__name__)

_MAX_PRIME_BITS = 60
# Primes must be 1 mod 2N; below ~20 bits there are too few of them for N up to 32768.
_MIN_PRIME_BITS = 20
_RING_DEGREES = (8192, 16384, 32768)
# Float64 products are exact below 2^53: coefficients are cut into chunks of at most 32 bits,
# fewer when a layer's row sums of |W| exceed 2^21.
_EXACT_BITS = 53
_MAX_CHUNK_BITS = 32
# (scale bits, hidden weight bits, last-layer weight bits), most precise first. The scale is
# the noise floor of every value (fresh encryption and rescale rounding); weight bits set how
# finely weights are rounded; the last layer's weights only cost bits of its own prime.
_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (26, 16, 22),
    (25, 16, 22),
    (25, 16, 20),
    (25, 15, 20),
    (24, 15, 20),
    (24, 14, 20),
    (24, 14, 18),
    (23, 14, 18),
    (23, 13, 18),
    (22, 13, 16),
    (22, 12, 16),
)


class BatchEvaluationError(EvaluationError):
    """Input ciphertexts or keys that do not fit the batch plan; the message says what to fix."""


@runtime_checkable
class _Affine(Protocol):
    """An affine map from ``normalise``: ``matrix`` (out, in) and ``bias`` (out,)."""

    matrix: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class BatchAffine:
    """``y = weights @ x[inputs] / weight_scale + bias``, weights integer-valued.

    ``inputs`` picks the ciphertexts of the previous vector that the columns read (units whose
    weights all round to zero are pruned). Rows of the last map whose weights are all zero are
    constant outputs.
    """

    weights: np.ndarray
    weight_scale: float
    bias: np.ndarray
    inputs: tuple[int, ...]
    rescales: int
    description: str

    @property
    def scalar_multiplications(self) -> int:
        return int(np.count_nonzero(self.weights))

    def simulate(self, x: np.ndarray) -> np.ndarray:
        columns = x[list(self.inputs)] if self.inputs else np.zeros((0, x.shape[1]))
        return (self.weights @ columns) / self.weight_scale + self.bias[:, None]


@dataclass(frozen=True)
class BatchPoly:
    """``y = sum_i coeffs[i] x^i`` element-wise, degree 2 to 4 (lowest coefficient first).

    The top coefficient costs nothing: a ciphertext of ``x^d`` at scale ``S^d`` *is* one of
    ``a_d x^d`` at scale ``S^d / |a_d|`` (negated if ``a_d < 0``). Lower terms are scalar
    products at the output scale.
    """

    coeffs: tuple[float, ...]
    description: str

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.polynomial.polynomial.polyval(x, self.coeffs))


BatchLayer = BatchAffine | BatchPoly


@dataclass(frozen=True)
class BatchPlan:
    """A model compiled for one-sample-per-slot evaluation.

    ``steps`` are the normalised float maps and polynomial steps (the exact network);
    ``layers`` are what the evaluator runs (integer weights, pruned units).
    """

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[_Affine | PolyStep, ...]
    layers: tuple[BatchLayer, ...]
    input_length: int
    output_length: int

    @property
    def slot_count(self) -> int:
        return self.params.slot_count

    @property
    def depth(self) -> int:
        """Return how many rescales (primes dropped) an evaluation performs."""
        return sum(layer.rescales for layer in self.layers if isinstance(layer, BatchAffine))

    def simulate(self, features: np.ndarray, *, quantised: bool = False) -> np.ndarray:
        """Run the network on plain features, one sample per column.

        Args:
            features: an array (input_length, samples).
            quantised: use the integer weights the evaluator uses (what decryption returns,
                up to CKKS noise) instead of the exact float network.

        Returns:
            An array (output_length, samples).
        """
        value = np.asarray(features, dtype=np.float64)
        if value.ndim != 2 or value.shape[0] != self.input_length:
            raise ValueError(
                f"features must have shape ({self.input_length}, samples), got {value.shape}"
            )
        if quantised:
            for layer in self.layers:
                value = layer.simulate(value)
            return value
        for step in self.steps:
            if isinstance(step, _Affine):
                value = step.matrix @ value + step.bias[:, None]
            else:
                value = step.simulate(value)
        return value

    def summary(self) -> dict[str, Any]:
        """Return operation counts for one full group of samples, and the parameters."""
        width = self.input_length
        products = relins = scalar = size = 0
        for layer in self.layers:
            if isinstance(layer, BatchAffine):
                width = layer.weights.shape[0]
                scalar += layer.scalar_multiplications
                relins += width if size == 3 else 0  # the previous products, relinearized here
                size = 2
                continue
            lower = sum(1 for c in layer.coeffs[1:-1] if c != 0)
            cubed = layer.degree == 3 or (layer.degree == 4 and layer.coeffs[3] != 0)
            products += width * (1 + (layer.degree == 4) + cubed)
            relins += width * (layer.degree > 2)
            scalar += width * lower
            size = 3
        return {
            "mode": "batch",
            "samples_per_request": self.slot_count,
            "input_ciphertexts": self.input_length,
            "output_ciphertexts": self.output_length,
            "depth": self.depth,
            "rotations": 0,
            "ciphertext_multiplications": products,
            "relinearizations": relins,
            "rescales": self._rescale_count(),
            "scalar_multiplications": scalar,
            "steps": [layer.description for layer in self.layers],
            "parameters": self.params_reason,
        }

    def _rescale_count(self) -> int:
        return sum(
            layer.rescales * layer.weights.shape[0]
            for layer in self.layers
            if isinstance(layer, BatchAffine)
        )


# --------------------------------------------------------------------------------------------
# Compilation: parameters and integer weights.


def compile_batch_plan(
    artifact: ModelArtifact,
    *,
    poly_modulus_degree: int | None = None,
    candidates: Sequence[tuple[int, int, int]] | None = None,
) -> BatchPlan:
    """Compile an artifact for one sample per slot.

    Args:
        artifact: a model checked by ``load_artifact``.
        poly_modulus_degree: force the ring degree; by default the smallest of 8192, 16384,
            32768 that holds the network (N/2 samples per request).
        candidates: (scale bits, weight bits, last-layer weight bits) to choose from, most
            precise first (measurements); by default the calibrated list.

    Returns:
        The plan: CKKS parameters, integer layers, the exact network for reference.

    Raises:
        CompileError: an unsupported layer, or a network too deep for 128-bit parameters.
    """
    ops = normalise(artifact)
    affines: list[_Affine] = []
    polys: list[PolyStep] = []
    for index, op in enumerate(ops):
        is_affine = isinstance(op, _Affine)
        if is_affine != (index % 2 == 0):
            raise CompileError("the batch plan needs affine maps and activations to alternate")
        if is_affine:
            affines.append(op)  # type: ignore[arg-type]
        else:
            polys.append(op)  # type: ignore[arg-type]
    degrees = (poly_modulus_degree,) if poly_modulus_degree else _RING_DEGREES
    activations = [_poly_of(step) for step in polys]
    chain = _choose_chain(affines, activations, degrees, candidates or _CANDIDATES)
    scales = [_weight_scale(a.matrix, chain.weight_bits[k]) for k, a in enumerate(affines)]
    layers = _integer_layers(affines, activations, scales, chain.rescales)
    steps: tuple[_Affine | PolyStep, ...] = tuple(ops)
    return BatchPlan(
        params=chain.params,
        params_reason=chain.reason,
        steps=steps,
        layers=layers,
        input_length=int(math.prod(artifact.input_shape)),
        output_length=int(affines[-1].matrix.shape[0]),
    )


@dataclass(frozen=True)
class _Chain:
    params: CkksParams
    weight_bits: tuple[int, ...]
    rescales: tuple[int, ...]
    reason: dict[str, Any]


def _weight_scale(matrix: np.ndarray, bits: int) -> float:
    largest = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    return float(2.0**bits / largest) if largest > 0 else float(2.0**bits)


def _poly_of(step: PolyStep) -> BatchPoly:
    """Return an activation's coefficients, lowest first.

    The known forms are expanded exactly: x^2; (x^2 + k)^2 + m x; x (x^2 + k) or
    x^2 (c3 x + c2) + c1 x. Anything else is read off ``simulate`` (the definition of a step)
    and checked at other points.
    """
    known = _known_coefficients(step)
    if known is not None:
        return BatchPoly(known, step.description)
    points = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    coeffs = np.polynomial.polynomial.polyfit(points, step.simulate(points), 4)
    largest = float(np.max(np.abs(coeffs)))
    coeffs[np.abs(coeffs) <= 1e-12 * largest] = 0.0
    degree = int(np.max(np.flatnonzero(coeffs), initial=0))
    if abs(coeffs[degree] - 1.0) <= 1e-12:
        coeffs[degree] = 1.0
    probe = np.array([-3.0, -0.5, 0.7, 3.0])
    expected = step.simulate(probe)
    if degree < 2 or not np.allclose(
        np.polynomial.polynomial.polyval(probe, coeffs[: degree + 1]),
        expected,
        rtol=1e-9,
        atol=1e-9 * float(np.max(np.abs(expected))),
    ):
        raise CompileError(f"activation {step.description!r} is not a polynomial of degree 2-4")
    return BatchPoly(tuple(float(c) for c in coeffs[: degree + 1]), step.description)


def _known_coefficients(step: PolyStep) -> tuple[float, ...] | None:
    if isinstance(step, SquareStep):
        return (0.0, 0.0, 1.0)
    # Read through getattr: the cubic's parametrisation has changed before.
    k, m = getattr(step, "k", None), getattr(step, "m", None)
    if isinstance(step, QuarticStep) and k is not None and m is not None:
        return (float(k) * float(k), float(m), 2.0 * float(k), 0.0, 1.0)
    if isinstance(step, CubicStep):
        if k is not None:
            return (0.0, float(k), 0.0, 1.0)
        c1, c2, c3 = (getattr(step, name, None) for name in ("c1", "c2", "c3"))
        if c1 is not None and c2 is not None and c3 is not None and c3:
            return (0.0, float(c1), float(c2), float(c3))
    return None


def _growth(poly: BatchPoly, scale_bits: float) -> float:
    """Return the output scale (bits) of an activation whose input has this scale."""
    return poly.degree * scale_bits - math.log2(abs(poly.coeffs[-1]))


def _split(bits: float) -> list[int]:
    count = math.ceil(bits / _MAX_PRIME_BITS)
    total = round(bits)
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _schedule(
    log_scales: Sequence[float], polys: Sequence[BatchPoly], scale_bits: int
) -> tuple[list[list[int]], int, list[tuple[float, int]]] | None:
    """Plan the rescales in bits, from nominal prime sizes (a b-bit prime is about 2^b).

    After each affine map, drop primes worth the scale's excess over ``2^scale_bits`` (none if
    that is too small for a prime, as after a first map); the output keeps 12 bits of headroom
    in the last prime.

    Returns:
        The primes dropped after each affine map, the output prime, and every scale reached
        (bits) with the number of primes dropped by then; None if the output would need a
        prime above 60 bits.
    """
    scale = float(scale_bits)
    drops: list[list[int]] = []
    dropped = 0
    checkpoints = [(scale, 0)]
    for k, log_s in enumerate(log_scales):
        scale += log_s
        checkpoints.append((scale, dropped))
        last = k == len(log_scales) - 1
        excess = scale - scale_bits
        if last and scale + OUTPUT_HEADROOM_BITS + 1 <= _MAX_PRIME_BITS:
            excess = 0.0  # the output fits one prime as it is: no rescale needed
        primes = _split(excess) if excess >= _MIN_PRIME_BITS else []
        drops.append(primes)
        scale -= sum(primes)
        dropped += len(primes)
        if not last:
            scale = _growth(polys[k], scale)
            checkpoints.append((scale, dropped))
    output = math.ceil(scale + OUTPUT_HEADROOM_BITS + 1)
    if output > _MAX_PRIME_BITS:
        return None
    return drops, max(output, _MIN_PRIME_BITS), checkpoints


def _choose_chain(
    affines: Sequence[_Affine],
    polys: Sequence[BatchPoly],
    degrees: Sequence[int],
    candidates: Sequence[tuple[int, int, int]],
) -> _Chain:
    """Pick the ring, then the fewest primes, then the most precise candidate.

    Every SEAL operation costs in proportion to the primes a ciphertext carries, so fewer
    primes win over precision (every candidate is precise enough for the shipped models).
    The special prime only needs to match the largest data prime: relinearization happens
    before the rescale, at scales of 2^60 and more, where key-switching noise is negligible;
    what the budget leaves goes to it anyway.
    """
    for degree in degrees:
        budget = MAX_COEFF_BITS_128[degree]
        options: list[tuple[int, int, list[int], list[list[int]], tuple[int, int, int]]] = []
        for rank, candidate in enumerate(candidates):
            scale_bits, weight, last = candidate
            bits = [weight] * (len(affines) - 1) + [last]
            logs = [
                math.log2(_weight_scale(a.matrix, b)) for a, b in zip(affines, bits, strict=True)
            ]
            planned = _schedule(logs, polys, scale_bits)
            if planned is None:
                continue
            drops, output, checkpoints = planned
            # SEAL drops the last data prime first.
            data = [output] + [p for group in reversed(drops) for p in reversed(group)]
            if sum(data) + max(data) > budget:
                continue
            # SEAL refuses a product whose scale reaches the modulus left at its level.
            if any(bits >= sum(data[: len(data) - n]) - 1 for bits, n in checkpoints):
                continue
            options.append((len(data), rank, data, drops, candidate))
        if not options:
            continue
        count, _, data, drops, (scale_bits, weight, last) = min(options, key=lambda o: o[:2])
        special = min(_MAX_PRIME_BITS, budget - sum(data))
        bits = [weight] * (len(affines) - 1) + [last]
        reason = {
            "mode": "batch: one sample per slot, no rotations",
            "data_primes": count,
            "total_coeff_bits": sum(data) + special,
            "max_coeff_bits_at_128_bit_security": budget,
            "scale_bits": scale_bits,
            "weight_bits": bits,
            "rescales_after_affine": [len(g) for g in drops],
            "reason": (
                f"N={degree}: {degree // 2} samples per ciphertext; {count} data primes, the "
                f"fewest that hold {len(polys)} activation(s) with lazy rescaling; then the most "
                f"precise scale ({scale_bits} bits) and weight rounding ({weight} bits, "
                f"{last} in the last layer) within the {budget}-bit 128-bit budget; "
                f"{special}-bit special prime"
            ),
        }
        params = CkksParams(degree, (*data, special), scale_bits)
        return _Chain(params, tuple(bits), tuple(len(g) for g in drops), reason)
    raise CompileError(
        f"the network's {len(polys)} activation(s) do not fit CKKS parameters at 128-bit "
        f"security with N <= {max(degrees)}; use fewer or lower-degree activations"
    )


def _integer_layers(
    affines: Sequence[_Affine],
    polys: Sequence[BatchPoly],
    scales: Sequence[float],
    rescales: Sequence[int],
) -> tuple[BatchLayer, ...]:
    """Round weights to integers, then prune units that are constant or unused.

    A hidden unit whose integer weights are all zero is a constant: its activation value goes
    into the next bias. A unit that no next-layer weight reads is dropped. Both repeat until
    nothing changes, so no ciphertext is ever computed for nothing (and SEAL never sees an
    all-zero, "transparent", ciphertext).
    """
    weights = [np.round(a.matrix * s) for a, s in zip(affines, scales, strict=True)]
    biases = [np.asarray(a.bias, dtype=np.float64).copy() for a in affines]
    inputs = np.arange(weights[0].shape[1])
    last = len(weights) - 1
    changed = True
    while changed:
        changed = False
        for k in range(last):
            nxt = weights[k + 1]
            constant = ~np.any(weights[k] != 0, axis=1)
            if np.any(constant):
                values = polys[k].simulate(biases[k][constant])
                biases[k + 1] = biases[k + 1] + (nxt[:, constant] / scales[k + 1]) @ values
            keep = ~constant & np.any(nxt != 0, axis=0)
            if not np.all(keep):
                weights[k], biases[k], weights[k + 1] = (
                    weights[k][keep],
                    biases[k][keep],
                    nxt[:, keep],
                )
                changed = True
        used = np.any(weights[0] != 0, axis=0)
        if not np.all(used):
            weights[0], inputs = weights[0][:, used], inputs[used]
            changed = True
    if not np.any(weights[last] != 0):
        raise CompileError(
            "every output of the network is a constant once weights are rounded: the model "
            "does not depend on its input"
        )
    layers: list[BatchLayer] = []
    for k, w in enumerate(weights):
        constant = int(np.count_nonzero(~np.any(w != 0, axis=1)))
        layers.append(
            BatchAffine(
                weights=w,
                weight_scale=scales[k],
                bias=biases[k],
                inputs=tuple(int(i) for i in (inputs if k == 0 else range(w.shape[1]))),
                rescales=rescales[k],
                description=(
                    f"affine {w.shape[1]}->{w.shape[0]} ({np.count_nonzero(w)} integer weights"
                    + (f", {constant} constant outputs" if constant else "")
                    + f"), {rescales[k]} rescale(s)"
                ),
            )
        )
        if k < last:
            layers.append(polys[k])
    return tuple(layers)


# --------------------------------------------------------------------------------------------
# Raw access to SEAL ciphertext memory.


class _RawAccessError(RuntimeError):
    """The ciphertext's memory layout is not the one this module reads."""


# A pybind11 instance is PyObject_HEAD (2 words) then the pointer to the C++ object. A SEAL 4
# Ciphertext is parms_id (4 words), is_ntt_form, size, poly_modulus_degree, coeff_modulus_size,
# scale, correction_factor, then DynArray data_: pool handle (2 words), capacity, size, pointer.
_PY_VALUE_WORD = 2
_CT_WORDS = 15
_U64 = ctypes.c_uint64


def _raw_view(ct: seal.Ciphertext) -> np.ndarray:
    """Return a writable numpy view (size, limbs, N) of a ciphertext's coefficients.

    The view shares memory with ``ct``: use it only while ``ct`` is alive and not resized.

    Raises:
        _RawAccessError: the memory does not match the ciphertext's metadata.
    """
    address = (_U64 * 3).from_address(id(ct))[_PY_VALUE_WORD]
    if not address:
        raise _RawAccessError("no C++ object behind the ciphertext")
    words = (_U64 * _CT_WORDS).from_address(address)
    size, degree, limbs = ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()
    count = size * degree * limbs
    if (
        list(words[0:4]) != list(ct.parms_id())
        or (words[5], words[6], words[7], words[13]) != (size, degree, limbs, count)
        or words[12] < count
        or not words[14]
        or size < 1
    ):
        raise _RawAccessError("ciphertext metadata does not match the expected layout")
    array = np.ctypeslib.as_array((_U64 * count).from_address(words[14])).reshape(
        size, limbs, degree
    )
    if any(int(array[i, 0, 0]) != ct.data(i) for i in range(size)):
        raise _RawAccessError("ciphertext data pointer does not match SEAL's accessors")
    return array


@functools.cache
def raw_access_available() -> bool:
    """Check once per process that ``_raw_view`` reads exactly what SEAL serializes."""
    try:
        import zstandard

        from he_service.protocol.seal_io import save_seal

        params = CkksParams(4096, (30, 30, 40), 25)
        context = seal_context(params)
        keygen = seal.KeyGenerator(context)
        plain = seal.Plaintext()
        encoder = seal.CKKSEncoder(context)
        encoder.encode(np.linspace(-1.0, 1.0, params.slot_count).tolist(), params.scale, plain)
        ct = seal.Ciphertext()
        seal.Encryptor(context, keygen.secret_key()).encrypt_symmetric(plain, ct)
        seal.Evaluator(context).square_inplace(ct)  # size 3, data written by SEAL itself
        view = _raw_view(ct)
        data = save_seal(ct)
        header, compression = 16, data[5]  # SEAL header: magic, size, version, compression
        if compression == 2:  # zstd, as SEAL saves by default
            payload = zstandard.ZstdDecompressor().decompress(data[header:], 1 << 22)
        else:
            payload = data[header:]
        return bool(payload[-view.nbytes :] == view.tobytes()) and view.shape == (3, 2, 4096)
    except Exception:  # any mismatch means: do not touch SEAL memory
        return False


# --------------------------------------------------------------------------------------------
# Evaluation.


@dataclass
class _Level:
    parms_id: list[int]
    moduli: list[int]


@dataclass
class _Tile:
    """One dense product: ``weights @ x[start:stop]`` fills rows ``[first, last)``.

    Rows are numbered in the layer's tile order (``_AffineRun.order``), so that every tile
    writes a contiguous block of one output buffer.
    """

    first: int
    last: int
    start: int
    stop: int
    weights: np.ndarray


@dataclass
class _AffineRun:
    """An affine layer bound to its level: product tiles and bias constants per prime."""

    layer: BatchAffine
    level: int
    input_scale: float
    output_scale: float
    order: np.ndarray  # output rows in tile order; rows with no weight (constants) last
    tiles: list[_Tile]
    chunk_bits: int
    row_sum_bits: float  # log2 of the largest row sum of |W|
    bias: np.ndarray  # (rows in tile order, limbs) int64: round(bias * output_scale) mod q
    constant_rows: np.ndarray


@dataclass
class _PolyRun:
    """An activation bound to its level: the sign of its top term, lower terms, constant."""

    poly: BatchPoly
    level: int
    input_scale: float
    output_scale: float
    negate: bool
    terms: dict[int, seal.Plaintext]  # power -> coefficient at output_scale / input_scale^power
    constant: seal.Plaintext | None


def _round_half_away(value: float) -> int:
    """Round like C++ ``std::round`` (SEAL's encoder), not like Python's banker's rounding."""
    magnitude = math.floor(abs(value) + 0.5)
    return int(magnitude) if value >= 0 else -int(magnitude)


def _chunk_bits(weights: np.ndarray) -> int:
    """Return the widest coefficient chunk whose products with these weights stay exact."""
    largest = float(np.abs(weights).sum(axis=1).max()) if weights.size else 0.0
    if largest >= 2.0 ** (_EXACT_BITS - 1):
        raise CompileError("integer weights too large for exact products; use fewer weight bits")
    return int(min(_MAX_CHUNK_BITS, math.floor(_EXACT_BITS - math.log2(max(largest, 1.0)))))


# A product of r rows over a span of c columns costs about (r + _ROW_OVERHEAD) * c: small
# products run far below BLAS peak (measured at N=8192 on 2 cores).
_ROW_OVERHEAD = 8


def _tiles_for(weights: np.ndarray) -> tuple[np.ndarray, list[_Tile]]:
    """Cover a layer's non-zero weights with dense blocks over contiguous column ranges.

    Rows sorted by their first and last non-zero column are merged into a block while one
    product over the union of their ranges is cheaper than separate ones. A convolution's rows
    for one row of windows read one band of the image: mnist-cnn's 256x784 conv (6% non-zero)
    becomes 8 products of 32x196, four times fewer multiplies than dense and no gathering; a
    dense layer stays one product.

    Returns:
        The rows in tile order (rows without weights last) and the tiles.
    """
    nonzero = weights != 0
    live = np.flatnonzero(nonzero.any(axis=1))
    first = nonzero[live].argmax(axis=1)
    last = weights.shape[1] - 1 - nonzero[live, ::-1].argmax(axis=1)
    blocks: list[tuple[list[int], int, int]] = []
    for index in np.lexsort((last, first)):
        row, lo, hi = int(live[index]), int(first[index]), int(last[index]) + 1
        if blocks:
            rows, b_lo, b_hi = blocks[-1]
            u_lo, u_hi = min(lo, b_lo), max(hi, b_hi)
            merged = (len(rows) + 1 + _ROW_OVERHEAD) * (u_hi - u_lo)
            apart = (len(rows) + _ROW_OVERHEAD) * (b_hi - b_lo) + (1 + _ROW_OVERHEAD) * (hi - lo)
            if merged <= apart:
                blocks[-1] = ([*rows, row], u_lo, u_hi)
                continue
        blocks.append(([row], lo, hi))
    if len(blocks) == 1 and len(blocks[0][0]) == weights.shape[0]:
        blocks = [(list(range(weights.shape[0])), blocks[0][1], blocks[0][2])]  # keep dense order
    tiles: list[_Tile] = []
    order: list[int] = []
    for rows, lo, hi in blocks:
        block = np.ascontiguousarray(weights[np.asarray(rows), lo:hi])
        tiles.append(_Tile(len(order), len(order) + len(rows), lo, hi, block))
        order += rows
    order += [int(r) for r in np.flatnonzero(~nonzero.any(axis=1))]
    return np.asarray(order, dtype=np.int64), tiles


class BatchEvaluator:
    """A batch plan bound to SEAL objects; every constant is prepared when the model loads.

    Args:
        plan: the compiled plan.
        backend: ``"auto"`` (integer products on SEAL memory when the layout check passes),
            ``"numpy"`` (require that) or ``"seal"`` (``multiply_plain`` per weight: the slow
            reference). The SEAL path encodes each scalar on the fly (6 us, 2% of its time);
            caching them would take up to 12,000 plaintexts of 256 KB for mnist-cnn.

    Raises:
        BatchEvaluationError: the parameters or backend cannot run the plan.
    """

    def __init__(self, plan: BatchPlan, *, backend: str = "auto") -> None:
        if backend not in ("auto", "numpy", "seal"):
            raise ValueError("backend must be 'auto', 'numpy' or 'seal'")
        raw = raw_access_available()
        if backend == "numpy" and not raw:
            raise BatchEvaluationError("numpy backend unavailable: SEAL memory layout differs")
        self.backend = "numpy" if backend in ("auto", "numpy") and raw else "seal"
        if backend == "auto" and not raw:
            _log.warning(
                "SEAL's ciphertext layout is not the expected one: batch affine maps fall back "
                "to multiply_plain, about 15x slower"
            )
        self.plan = plan
        self.context = seal_context(plan.params)
        self._encoder = seal.CKKSEncoder(self.context)
        self._evaluator = seal.Evaluator(self.context)
        self._levels: list[_Level] = []
        data = self.context.first_context_data()
        while data is not None:
            self._levels.append(
                _Level(list(data.parms_id()), [m.value() for m in data.parms().coeff_modulus()])
            )
            data = data.next_context_data()
        if len(self._levels) < plan.depth + 1:
            raise BatchEvaluationError("parameters hold fewer levels than the plan drops")
        self.input_parms_id = self._levels[0].parms_id
        self.input_scale = plan.params.scale
        self._runs: list[_AffineRun | _PolyRun] = []
        # Scales follow SEAL's own double arithmetic (products, division by the dropped prime),
        # so that constants can be prepared here, at the scale where they are added.
        scale, level = self.input_scale, 0
        for layer in plan.layers:
            if isinstance(layer, BatchAffine):
                run = self._affine_run(layer, level, scale)
                self._runs.append(run)
                scale = run.output_scale
                for _ in range(layer.rescales):
                    scale = scale / float(self._levels[level].moduli[-1])
                    level += 1
            else:
                poly = self._poly_run(layer, level, scale)
                self._runs.append(poly)
                scale = poly.output_scale
        self.output_scale = scale
        self.output_parms_id = self._levels[level].parms_id
        last = self._runs[-1]
        assert isinstance(last, _AffineRun)
        self._constants = {
            int(row): [
                _round_half_away(float(last.layer.bias[row]) * scale) % q
                for q in self._levels[level].moduli
            ]
            for row in last.constant_rows
        }
        if self.backend == "seal" and self._constants:
            raise BatchEvaluationError(
                "the model has constant outputs, which only the numpy backend can produce"
            )

    def _affine_run(self, layer: BatchAffine, level: int, scale: float) -> _AffineRun:
        output_scale = scale * layer.weight_scale
        moduli = self._levels[level].moduli
        bias = np.zeros((layer.weights.shape[0], len(moduli)), dtype=np.int64)
        for row, value in enumerate(layer.bias):
            integer = _round_half_away(float(value) * output_scale)
            bias[row] = [integer % q for q in moduli]
        constant = np.flatnonzero(~np.any(layer.weights != 0, axis=1))
        order, tiles = _tiles_for(layer.weights)
        chunk = _chunk_bits(layer.weights)
        row_sum = float(np.abs(layer.weights).sum(axis=1).max()) if layer.weights.size else 1.0
        for q in moduli:
            delta = (1 << q.bit_length()) - q
            if q.bit_length() > chunk and delta.bit_length() + chunk > 60:
                raise BatchEvaluationError("a prime is too far below a power of two")
        return _AffineRun(
            layer,
            level,
            scale,
            output_scale,
            order,
            tiles,
            chunk,
            math.log2(max(row_sum, 1.0)),
            bias[order],
            constant,
        )

    def _poly_run(self, poly: BatchPoly, level: int, scale: float) -> _PolyRun:
        powers = [1.0, scale, scale * scale]
        powers += [powers[2] * scale, powers[2] * powers[2]]
        lead = poly.coeffs[-1]
        output = powers[poly.degree] / abs(lead)
        parms_id = self._levels[level].parms_id
        terms = {
            i: self._scalar(c, parms_id, output / powers[i])
            for i, c in enumerate(poly.coeffs[:-1])
            if i and c
        }
        constant = self._scalar(poly.coeffs[0], parms_id, output) if poly.coeffs[0] else None
        return _PolyRun(poly, level, scale, output, lead < 0, terms, constant)

    def _scalar(self, value: float, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(float(value), parms_id, scale, plain)
        return plain

    def check_inputs(self, cts: Sequence[seal.Ciphertext]) -> None:
        """Refuse inputs that do not fit the plan.

        Args:
            cts: the request's ciphertexts, one per input feature.

        Raises:
            BatchEvaluationError: wrong count, level, scale or size, or a transparent input.
        """
        expected = self.plan.input_length
        if len(cts) != expected:
            raise BatchEvaluationError(
                f"got {len(cts)} input ciphertexts; the model takes {expected}, one per input "
                f"feature (sample j in slot j)"
            )
        for index, ct in enumerate(cts):
            what = f"input ciphertext {index}"
            if not isinstance(ct, seal.Ciphertext):
                raise BatchEvaluationError(f"{what} is not a SEAL ciphertext")
            if ct.size() != 2:
                raise BatchEvaluationError(
                    f"{what} has {ct.size()} polynomials; a fresh ciphertext has 2"
                )
            if ct.is_transparent():
                raise BatchEvaluationError(f"{what} is transparent (not encrypted); encrypt it")
            if not ct.is_ntt_form():
                raise BatchEvaluationError(f"{what} is not in NTT form; encrypt it with CKKS")
            if list(ct.parms_id()) != self.input_parms_id:
                raise BatchEvaluationError(
                    f"{what} is at the wrong level ({ct.coeff_modulus_size()} primes); encrypt "
                    f"at the top level of the card's parameters "
                    f"({len(self.plan.params.coeff_modulus_bits) - 1} primes)"
                )
            if ct.scale != self.input_scale:
                raise BatchEvaluationError(
                    f"{what} has scale {ct.scale:.6g}; the card asks for 2^"
                    f"{self.plan.params.scale_bits}"
                )

    def evaluate(
        self,
        cts: Sequence[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        timings: Timings | None = None,
    ) -> list[seal.Ciphertext]:
        """Evaluate the plan on input ciphertexts checked by ``check_inputs``.

        Args:
            cts: one ciphertext per input feature.
            relin_keys: the caller's relinearization keys.
            timings: where to add seconds: ``affine`` (the integer matrix products) and
                ``activation`` (SEAL: products, relinearizations, rescales).

        Returns:
            One ciphertext (size 2) per model output, sample j in slot j.
        """
        timings = timings if timings is not None else Timings()
        vector = list(cts)
        for run in self._runs:
            start = time.perf_counter()
            if isinstance(run, _PolyRun):
                vector = self._poly(vector, run, relin_keys)
                timings.add("activation", time.perf_counter() - start)
                continue
            vector = self._affine(vector, run)
            middle = time.perf_counter()
            timings.add("affine", middle - start)
            constant = set(self._constants) if run is self._runs[-1] else set()
            self._rescale_relinearize(vector, run.layer.rescales, relin_keys, skip=constant)
            timings.add("activation", time.perf_counter() - middle)
        if self._constants:
            self._write_constants(vector)
        return vector

    def _rescale_relinearize(
        self,
        vector: list[seal.Ciphertext],
        rescales: int,
        relin_keys: seal.RelinKeys,
        skip: set[int],
    ) -> None:
        """Drop all primes but one, relinearize, drop the last one.

        Rescaling a 3-polynomial ciphertext adds rounding noise times s^2, about sqrt(N)
        times more than with 2 (measured on mnist-cnn: a logit error of 2.4 instead of 1e-3 when
        relinearizing after the last rescale). While the scale is still far above its final
        value that noise is negligible, and relinearizing with fewer primes is cheaper.
        """
        ev = self._evaluator
        for index, ct in enumerate(vector):
            if index in skip:
                continue
            if ct.size() > 2:
                for _ in range(rescales - 1):
                    ev.rescale_to_next_inplace(ct)
                ev.relinearize_inplace(ct, relin_keys)
                if rescales:
                    ev.rescale_to_next_inplace(ct)
            else:
                for _ in range(rescales):
                    ev.rescale_to_next_inplace(ct)

    def _write_constants(self, vector: list[seal.Ciphertext]) -> None:
        """Turn outputs whose weights all round to zero into their known value (c1 = 0)."""
        template = next(ct for i, ct in enumerate(vector) if i not in self._constants)
        for row, residues in self._constants.items():
            ct = seal.Ciphertext()
            self._evaluator.negate(template, ct)
            view = _raw_view(ct)
            view[0] = np.asarray(residues, dtype=np.uint64)[:, None]
            view[1:] = 0
            ct.scale = self.output_scale
            vector[row] = ct

    def _poly(
        self, vector: list[seal.Ciphertext], run: _PolyRun, relin_keys: seal.RelinKeys
    ) -> list[seal.Ciphertext]:
        ev = self._evaluator
        degree = run.poly.degree
        out: list[seal.Ciphertext] = []
        for x in vector:
            square = seal.Ciphertext()
            ev.square(x, square)
            powers = {1: x, 2: square}
            if degree == 2:
                top = square  # left at 3 polynomials: the next affine map works on those
            else:
                ev.relinearize_inplace(square, relin_keys)
                top = seal.Ciphertext()
                if degree == 3:
                    ev.multiply(square, x, top)
                else:
                    ev.square(square, top)
                if 3 in run.terms:
                    powers[3] = seal.Ciphertext()
                    ev.multiply(square, x, powers[3])
            if run.negate:
                ev.negate_inplace(top)
            top.scale = run.output_scale  # x^d at S^d is a_d x^d at S^d / |a_d|
            for power, plain in run.terms.items():
                term = seal.Ciphertext()
                ev.multiply_plain(powers[power], plain, term)
                # Equal up to the last bit of the double scale arithmetic.
                if abs(term.scale - top.scale) > 1e-9 * top.scale:
                    raise BatchEvaluationError("internal scale mismatch in an activation")
                term.scale = top.scale
                ev.add_inplace(top, term)
            if run.constant is not None:
                ev.add_plain_inplace(top, run.constant)
            out.append(top)
        return out

    def _affine(self, vector: list[seal.Ciphertext], run: _AffineRun) -> list[seal.Ciphertext]:
        inputs = [vector[i] for i in run.layer.inputs]
        parms_id = self._levels[run.level].parms_id
        for ct in inputs:
            if ct.scale != run.input_scale or list(ct.parms_id()) != parms_id:
                raise BatchEvaluationError("internal level or scale mismatch at an affine map")
        if self.backend == "seal":
            return self._affine_seal(inputs, run)
        return self._affine_numpy(inputs, run)

    def _affine_seal(self, inputs: list[seal.Ciphertext], run: _AffineRun) -> list[seal.Ciphertext]:
        """The reference: one ``multiply_plain`` and ``add`` per non-zero weight."""
        ev, encoder = self._evaluator, self._encoder
        parms_id = self._levels[run.level].parms_id
        weights = run.layer.weights
        plain = seal.Plaintext()
        out: list[seal.Ciphertext] = []
        for row in range(weights.shape[0]):
            total: seal.Ciphertext | None = None
            for col in np.flatnonzero(weights[row]):
                # An integer at scale 1 is that integer in every coefficient.
                encoder.encode(float(weights[row, col]), parms_id, 1.0, plain)
                product = seal.Ciphertext()
                ev.multiply_plain(inputs[col], plain, product)
                if total is None:
                    total = product
                else:
                    ev.add_inplace(total, product)
            assert total is not None  # constant rows are refused in __init__
            total.scale = run.output_scale
            encoder.encode(float(run.layer.bias[row]), parms_id, run.output_scale, plain)
            ev.add_plain_inplace(total, plain)
            out.append(total)
        return out

    def _affine_numpy(
        self, inputs: list[seal.Ciphertext], run: _AffineRun
    ) -> list[seal.Ciphertext]:
        """The same integers as ``_affine_seal``, as float64 matrix products per prime.

        Buffers are allocated once per call and reused for every prime and polynomial: fresh
        memory costs page faults (~0.15 ms per MB here).
        """
        ev = self._evaluator
        moduli = self._levels[run.level].moduli
        rows = run.layer.weights.shape[0]
        out = [seal.Ciphertext() for _ in range(rows)]
        for ct in out:
            ev.negate(inputs[0], ct)  # right level, size and NTT form; data overwritten below
            ct.scale = run.output_scale
        in_views = [_raw_view(ct) for ct in inputs]
        out_views = [_raw_view(out[j]) for j in run.order]
        size, _, degree = in_views[0].shape
        bits = run.chunk_bits
        counts = [-(-q.bit_length() // bits) for q in moduli]
        # chunks[i, j] = bits [j * bits, (j + 1) * bits) of input i's coefficients.
        chunks = np.empty((len(inputs), max(counts), degree))
        products = {c: np.zeros((rows, c * degree)) for c in set(counts)}
        total = np.empty((rows, degree), dtype=np.int64)
        spare = np.empty_like(total)
        result = np.empty((size, rows, degree), dtype=np.int64)
        unsigned = result.view(np.uint64)
        for limb, (q, count) in enumerate(zip(moduli, counts, strict=True)):
            buffer = products[count]
            for poly in range(size):
                for i, view in enumerate(in_views):
                    _split_chunks(view[poly, limb], bits, count, chunks[i, :count])
                flat = chunks[:, :count].reshape(len(inputs), count * degree)
                _tile_products(run.tiles, flat, buffer)
                _combine(buffer, q, bits, count, run.row_sum_bits, total, spare)
                if poly == 0:
                    total += run.bias[:, limb : limb + 1]
                _reduce(total, q, spare, out=result[poly])
            for position, view in enumerate(out_views):
                view[:, limb] = unsigned[:, position]
        return out


def _tile_products(tiles: list[_Tile], inputs: np.ndarray, out: np.ndarray) -> None:
    """Write every tile's product into its rows of ``out`` (rows of no tile are left alone)."""
    for tile in tiles:
        np.matmul(tile.weights, inputs[tile.start : tile.stop], out=out[tile.first : tile.last])


def _split_chunks(coefficients: np.ndarray, bits: int, count: int, out: np.ndarray) -> None:
    """Write ``coefficients`` (N,) as ``count`` rows of ``bits``-bit chunks into ``out``."""
    if bits == _MAX_CHUNK_BITS and count == 2:
        out[...] = coefficients.view(np.uint32).reshape(-1, 2).T  # little-endian halves
        return
    mask = np.uint64((1 << bits) - 1)
    for j in range(count):
        out[j] = (coefficients >> np.uint64(bits * j)) & mask


def _combine(
    products: np.ndarray,
    q: int,
    bits: int,
    count: int,
    row_sum_bits: float,
    total: np.ndarray,
    spare: np.ndarray,
) -> None:
    """Set ``total`` to ``sum_j products_j 2^(bits j)`` modulo q, up to one reduction.

    Each block ``products_j`` is an exact integer below 2^53; ``total`` ends below 2^62 in
    magnitude. When ``row_sums * q < 2^61`` the shifted sum fits int64 as it is; otherwise the
    blocks are put back together from the top, reducing as they go, with
    ``y 2^bits = (y >> (b - bits)) delta + ((y mod 2^(b - bits)) << bits)  (mod q)`` where
    ``q = 2^b - delta`` and delta is small (SEAL's primes sit just below a power of two).
    """
    degree = total.shape[1]
    width = q.bit_length()
    np.copyto(total, products[:, (count - 1) * degree :], casting="unsafe")
    if row_sum_bits + width <= 61:
        for j in range(count - 2, -1, -1):
            total <<= bits
            np.copyto(spare, products[:, j * degree : (j + 1) * degree], casting="unsafe")
            total += spare
        return
    shift = width - bits
    delta = (1 << width) - q
    for j in range(count - 2, -1, -1):
        _reduce(total, q, spare, out=total)
        np.right_shift(total, shift, out=spare)
        spare *= delta
        total &= (1 << shift) - 1
        total <<= bits
        total += spare
        np.copyto(spare, products[:, j * degree : (j + 1) * degree], casting="unsafe")
        total += spare


def _reduce(values: np.ndarray, q: int, spare: np.ndarray, out: np.ndarray) -> None:
    """Set ``out = values mod q`` in [0, q) (int64; ``spare`` is scratch, ``out`` may alias).

    A floor division by a scalar runs as a multiplication (libdivide): 3.6x faster than
    ``np.remainder`` here.
    """
    np.floor_divide(values, q, out=spare)
    spare *= q
    np.subtract(values, spare, out=out)
