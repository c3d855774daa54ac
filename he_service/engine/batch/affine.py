"""Affine maps on ciphertexts: constants prepared per level, and the two backends.

``"seal"`` is one ``multiply_plain`` and ``add`` per non-zero weight: the reference.
``"numpy"`` computes the same integers as matrix products on SEAL's memory (``products``,
``raw``), about 15x faster and bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.batch.errors import BatchEvaluationError
from he_service.engine.batch.plan import BatchAffine
from he_service.engine.batch.products import (
    Tile,
    chunk_bits,
    combine_chunks,
    largest_row_sum,
    reduce_mod,
    split_chunks,
    tile_products,
    tiles_for,
)
from he_service.engine.batch.raw import raw_view

__all__ = ["AffineRun", "affine_numpy", "affine_seal", "prepare_affine", "round_half_away"]


@dataclass
class AffineRun:
    """An affine layer bound to its level: product tiles and bias constants per prime."""

    layer: BatchAffine
    level: int
    input_scale: float
    output_scale: float
    order: np.ndarray  # output rows in tile order; rows with no weight (constants) last
    tiles: list[Tile]
    chunk_bits: int
    row_sum_bits: float  # log2 of the largest row sum of |W|
    bias: np.ndarray  # (rows in tile order, limbs) int64: round(bias * output_scale) mod q
    constant_rows: np.ndarray


def round_half_away(value: float) -> int:
    """Round like C++ ``std::round`` (SEAL's encoder), not like Python's banker's rounding."""
    magnitude = math.floor(abs(value) + 0.5)
    return int(magnitude) if value >= 0 else -int(magnitude)


def prepare_affine(layer: BatchAffine, level: int, moduli: list[int], scale: float) -> AffineRun:
    """Bind an affine layer to its level: tiles, chunk width, bias residues per prime.

    Raises:
        BatchEvaluationError: a prime too far below a power of two for ``combine_chunks``.
    """
    output_scale = scale * layer.weight_scale
    bias = np.zeros((layer.weights.shape[0], len(moduli)), dtype=np.int64)
    for row, value in enumerate(layer.bias):
        integer = round_half_away(float(value) * output_scale)
        bias[row] = [integer % q for q in moduli]
    constant = np.flatnonzero(~np.any(layer.weights != 0, axis=1))
    order, tiles = tiles_for(layer.weights)
    chunk = chunk_bits(layer.weights)
    for q in moduli:
        delta = (1 << q.bit_length()) - q
        if q.bit_length() > chunk and delta.bit_length() + chunk > 60:
            raise BatchEvaluationError("a prime is too far below a power of two")
    return AffineRun(
        layer,
        level,
        scale,
        output_scale,
        order,
        tiles,
        chunk,
        math.log2(max(largest_row_sum(layer.weights), 1.0)),
        bias[order],
        constant,
    )


def affine_seal(
    evaluator: seal.Evaluator,
    encoder: seal.CKKSEncoder,
    inputs: list[seal.Ciphertext],
    run: AffineRun,
    parms_id: list[int],
) -> list[seal.Ciphertext]:
    """The reference: one ``multiply_plain`` and ``add`` per non-zero weight."""
    weights = run.layer.weights
    plain = seal.Plaintext()
    out: list[seal.Ciphertext] = []
    for row in range(weights.shape[0]):
        total: seal.Ciphertext | None = None
        for col in np.flatnonzero(weights[row]):
            # An integer at scale 1 is that integer in every coefficient.
            encoder.encode(float(weights[row, col]), parms_id, 1.0, plain)
            product = seal.Ciphertext()
            evaluator.multiply_plain(inputs[col], plain, product)
            if total is None:
                total = product
            else:
                evaluator.add_inplace(total, product)
        assert total is not None  # BatchEvaluator refuses constant rows here
        total.scale = run.output_scale
        encoder.encode(float(run.layer.bias[row]), parms_id, run.output_scale, plain)
        evaluator.add_plain_inplace(total, plain)
        out.append(total)
    return out


def affine_numpy(
    evaluator: seal.Evaluator, inputs: list[seal.Ciphertext], run: AffineRun, moduli: list[int]
) -> list[seal.Ciphertext]:
    """The same integers as ``affine_seal``, as float64 matrix products per prime.

    Buffers are allocated once per call and reused for every prime and polynomial: fresh
    memory costs page faults (~0.15 ms per MB here).
    """
    rows = run.layer.weights.shape[0]
    out = [seal.Ciphertext() for _ in range(rows)]
    for ct in out:
        evaluator.negate(inputs[0], ct)  # right level, size and NTT form; data overwritten below
        ct.scale = run.output_scale
    in_views = [raw_view(ct) for ct in inputs]
    out_views = [raw_view(out[j]) for j in run.order]
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
                split_chunks(view[poly, limb], bits, count, chunks[i, :count])
            flat = chunks[:, :count].reshape(len(inputs), count * degree)
            tile_products(run.tiles, flat, buffer)
            combine_chunks(buffer, q, bits, count, run.row_sum_bits, total, spare)
            if poly == 0:
                total += run.bias[:, limb : limb + 1]
            reduce_mod(total, q, spare, out=result[poly])
        for position, view in enumerate(out_views):
            view[:, limb] = unsigned[:, position]
    return out
