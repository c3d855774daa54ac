"""Affine maps on ciphertexts: constants prepared per level, and the two backends.

``"seal"`` is one ``multiply_plain`` and ``add`` per non-zero weight: the reference.
``"numpy"`` computes the same integers as matrix products on SEAL's memory (``products``,
``raw``), about 15x faster and bit-identical.

A layer with several terms (a residual join) sums their products modulo each prime: every
term has its own tiles and chunk width, and its products are multiplied by ``2^shift``
before the sum. A term whose ciphertexts sit at a higher level than the layer is read as
SEAL's modulus switch would leave it: in NTT form that drops the last limbs, so the products
simply read the first ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.batch.errors import BatchEvaluationError
from he_service.engine.batch.plan import BatchAffine, BatchTerm
from he_service.engine.batch.products import (
    Tile,
    chunk_bits,
    combine_chunks,
    largest_row_sum,
    reduce_mod,
    shift_mod,
    split_chunks,
    tile_products,
    tiles_for,
)
from he_service.engine.batch.raw import raw_view

__all__ = [
    "AffineRun",
    "TermRun",
    "affine_numpy",
    "affine_seal",
    "prepare_affine",
    "round_half_away",
]

# Each term adds a value below q < 2^60 to the running sum: reduce before int64 overflows.
_TERMS_PER_REDUCTION = 6


@dataclass
class TermRun:
    """One term of an affine layer: product tiles, chunk width, where its rows go."""

    term: BatchTerm
    size: int  # polynomials of the ciphertexts it reads
    tiles: list[Tile]
    chunk_bits: int
    row_sum_bits: float  # log2 of the largest row sum of |W|
    gather: np.ndarray | None  # the layer's rows (output order) in this term's tile order


@dataclass
class AffineRun:
    """An affine layer bound to its level: its terms and bias constants per prime."""

    layer: BatchAffine
    level: int
    output_scale: float
    size: int  # polynomials of its outputs before relinearization
    order: np.ndarray  # output rows in the first term's tile order; rows without weights last
    terms: list[TermRun]
    bias: np.ndarray  # (rows in order, limbs) int64: round(bias * output_scale) mod q
    constant_rows: np.ndarray


def round_half_away(value: float) -> int:
    """Round like C++ ``std::round`` (SEAL's encoder), not like Python's banker's rounding."""
    if abs(value) >= 2.0**52:  # already an integer; adding 0.5 could round up
        return int(value)
    magnitude = math.floor(abs(value) + 0.5)
    return int(magnitude) if value >= 0 else -int(magnitude)


def prepare_affine(
    layer: BatchAffine,
    sizes: list[int],
    moduli: list[int],
    level: int,
    *,
    size: int | None = None,
) -> AffineRun:
    """Bind an affine layer to its level: tiles, chunk widths, bias residues per prime.

    Args:
        layer: the layer.
        sizes: polynomials of the ciphertexts each term reads.
        moduli: the primes of the layer's level.
        level: the layer's level.
        size: polynomials of its outputs, when more than its terms give (the rest of a layer
            whose other terms were accumulated already).

    Raises:
        BatchEvaluationError: a prime too far below a power of two for ``combine_chunks``.
    """
    output_scale = layer.scale
    bias = np.zeros((layer.rows, len(moduli)), dtype=np.int64)
    for row, value in enumerate(layer.bias):
        integer = round_half_away(float(value) * output_scale)
        bias[row] = [integer % q for q in moduli]
    terms: list[TermRun] = []
    order = np.arange(layer.rows)
    for index, term in enumerate(layer.terms):
        term_order, tiles = tiles_for(term.weights)
        chunk = chunk_bits(term.weights)
        for q in moduli:
            delta = (1 << q.bit_length()) - q
            if q.bit_length() > chunk and delta.bit_length() + chunk > 60:
                raise BatchEvaluationError("a prime is too far below a power of two")
        gather = None
        if index == 0:
            order = term_order
        else:
            position = np.empty_like(term_order)
            position[term_order] = np.arange(term_order.size)
            gather = position[order]
        terms.append(
            TermRun(
                term,
                sizes[index],
                tiles,
                chunk,
                math.log2(max(largest_row_sum(term.weights), 1.0)),
                gather,
            )
        )
    return AffineRun(
        layer,
        level,
        output_scale,
        max([*sizes, size or 2]),
        order,
        terms,
        bias[order],
        layer.constant_rows(),
    )


def affine_seal(
    evaluator: seal.Evaluator,
    encoder: seal.CKKSEncoder,
    sources: list[list[seal.Ciphertext]],
    run: AffineRun,
    parms_id: list[int],
) -> list[seal.Ciphertext]:
    """The reference: one ``multiply_plain`` and ``add`` per non-zero weight.

    Args:
        evaluator: SEAL's evaluator.
        encoder: SEAL's encoder.
        sources: per term, the ciphertexts its columns read, at the layer's level.
        run: the prepared layer.
        parms_id: the layer's level.
    """
    plain = seal.Plaintext()
    out: list[seal.Ciphertext] = []
    for row in range(run.layer.rows):
        total: seal.Ciphertext | None = None
        for term_run, inputs in zip(run.terms, sources, strict=True):
            weights = term_run.term.weights
            factor = 2.0**term_run.term.shift
            part: seal.Ciphertext | None = None
            for col in np.flatnonzero(weights[row]):
                # An integer at scale 1 is that integer in every coefficient.
                encoder.encode(float(weights[row, col]) * factor, parms_id, 1.0, plain)
                product = seal.Ciphertext()
                evaluator.multiply_plain(inputs[col], plain, product)
                if part is None:
                    part = product
                else:
                    evaluator.add_inplace(part, product)
            if part is None:
                continue
            part.scale = run.output_scale  # each term's weight scale lands it here
            if total is None:
                total = part
            else:
                evaluator.add_inplace(total, part)
        assert total is not None  # BatchEvaluator refuses constant rows here
        encoder.encode(float(run.layer.bias[row]), parms_id, run.output_scale, plain)
        evaluator.add_plain_inplace(total, plain)
        out.append(total)
    return out


def affine_numpy(
    evaluator: seal.Evaluator,
    sources: list[list[seal.Ciphertext]],
    run: AffineRun,
    moduli: list[int],
    template: seal.Ciphertext | None = None,
    *,
    into: list[seal.Ciphertext] | None = None,
) -> list[seal.Ciphertext]:
    """The same integers as ``affine_seal``, as float64 matrix products per prime.

    Buffers are allocated once per call and reused for every prime and polynomial: fresh
    memory costs page faults (~0.15 ms per MB here).

    Args:
        evaluator: SEAL's evaluator.
        sources: per term, the ciphertexts its columns read, at the layer's level or above.
        run: the prepared layer.
        moduli: the primes of the layer's level.
        template: a ciphertext at the layer's level with the outputs' size (new outputs).
        into: instead, existing outputs (one per row, at the layer's level and size) to add
            the results to, modulo each prime: a layer accumulated part by part.
    """
    rows = run.layer.rows
    if into is None:
        assert template is not None
        out = [seal.Ciphertext() for _ in range(rows)]
        for ct in out:
            evaluator.negate(template, ct)  # right level, size, NTT form; data overwritten below
            ct.scale = run.output_scale
    else:
        out = into
    out_views = [raw_view(out[j]) for j in run.order]
    degree = out_views[0].shape[2] if out_views else 0
    size = run.size
    single = len(run.terms) == 1 and run.terms[0].size == size
    parts = [
        _TermBuffers(t, inputs, moduli, rows, degree)
        for t, inputs in zip(run.terms, sources, strict=True)
    ]
    total = np.empty((0 if single else rows, degree), dtype=np.int64)
    spare = np.empty((rows, degree), dtype=np.int64)
    result = np.empty((size, rows, degree), dtype=np.int64)
    unsigned = result.view(np.uint64)
    for limb, q in enumerate(moduli):
        for poly in range(size):
            acc = result[poly]
            if single:  # a chain's layer: the products land in the result as they are
                part = parts[0]
                part.products(poly, limb, q, acc, spare)
                if part.run.term.shift:
                    reduce_mod(acc, q, spare, out=acc)
                    shift_mod(acc, part.run.term.shift, q, spare)
            else:
                live = [part for part in parts if poly < part.run.size]
                if not live:
                    acc[...] = 0
                for added, part in enumerate(live):
                    part.products(poly, limb, q, total, spare)
                    reduce_mod(total, q, spare, out=total)
                    if part.run.term.shift:
                        shift_mod(total, part.run.term.shift, q, spare)
                    gathered = total if part.run.gather is None else total[part.run.gather]
                    if added == 0:
                        acc[...] = gathered
                    else:
                        acc += gathered
                    if (added + 1) % _TERMS_PER_REDUCTION == 0:
                        reduce_mod(acc, q, spare, out=acc)
            if poly == 0:
                acc += run.bias[:, limb : limb + 1]
            reduce_mod(acc, q, spare, out=acc)
        if into is None:
            for position, view in enumerate(out_views):
                view[:, limb] = unsigned[:, position]
            continue
        for position, view in enumerate(out_views):
            target = view[:, limb]
            np.add(target, unsigned[:, position], out=target)  # both below q < 2^60
            np.minimum(target, target - np.uint64(q), out=target)  # below q: the sum wraps
    return out


class _TermBuffers:
    """A term's chunk and product buffers, and views of the ciphertexts it reads."""

    def __init__(
        self,
        run: TermRun,
        inputs: list[seal.Ciphertext],
        moduli: list[int],
        rows: int,
        degree: int,
    ) -> None:
        self.run = run
        self.views = [raw_view(ct) for ct in inputs]
        for view in self.views:
            if view.shape[0] != run.size or view.shape[1] < len(moduli):
                raise BatchEvaluationError("internal size or level mismatch at an affine map")
        self.counts = [-(-q.bit_length() // run.chunk_bits) for q in moduli]
        # chunks[i, j] = bits [j * bits, (j + 1) * bits) of input i's coefficients.
        self.chunks = np.empty((len(inputs), max(self.counts), degree))
        self.buffers = {c: np.zeros((rows, c * degree)) for c in set(self.counts)}

    def products(self, poly: int, limb: int, q: int, total: np.ndarray, spare: np.ndarray) -> None:
        """Set ``total`` to this term's integer products (up to one reduction), its rows."""
        bits, count = self.run.chunk_bits, self.counts[limb]
        for i, view in enumerate(self.views):
            split_chunks(view[poly, limb], bits, count, self.chunks[i, :count])
        flat = self.chunks[:, :count].reshape(len(self.views), count * total.shape[1])
        buffer = self.buffers[count]
        tile_products(self.run.tiles, flat, buffer)
        combine_chunks(buffer, q, bits, count, self.run.row_sum_bits, total, spare)
