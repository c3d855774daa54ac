"""Streaming a large layer through its activation into its one reader, to bound memory.

A batch group holds one ciphertext per unit of every layer, and lazy rescaling leaves the
first layers at full width: LeNet-5's first convolution is 3456 ciphertexts of 6 limbs at
N=16384 (5.4 GB), 8.2 GB once squared. When such an affine layer A feeds an activation P that
only one layer B reads, the evaluator runs A in chunks of rows: the chunk's products and
rescales, P on them, and their share of B's products, added modulo each prime into B's
outputs, which exist from the first chunk on. Memory holds B's outputs and one chunk instead
of all of A and P. (Freeing A's outputs while P's are made would not lower the peak: SEAL's
memory pool never returns memory and reuses a block only for a ciphertext of the same size.)

Chunks follow A's tile order (a convolution's rows sorted by the band of input they read), so
a chunk reads a band of A's inputs and reaches a band of B's rows. Only the numpy backend
streams; the integers are the same as without streaming (sums modulo primes commute).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from he_service.engine.batch.affine import AffineRun, prepare_affine
from he_service.engine.batch.plan import BatchAffine, BatchPlan, BatchPoly
from he_service.engine.batch.products import tiles_for

__all__ = ["STREAM_BYTES", "Stream", "StreamChunk", "plan_streams"]

# Stream a layer when it and its activation would hold more than this; a chunk holds about
# this much of both (LeNet-5 at N=16384: 13 chunks of 272 rows).
STREAM_BYTES = 1 << 30


@dataclass
class StreamChunk:
    """Some of A's rows, and what they add to B."""

    a_run: AffineRun  # A restricted to these rows (and the columns they read)
    a_columns: list[tuple[int, np.ndarray]]  # per term of a_run: A's term and its columns
    b_run: AffineRun | None  # B's term restricted to these units and the rows they reach
    b_columns: np.ndarray  # for each column of b_run, its unit's position in the chunk
    b_rows: np.ndarray  # B's rows that b_run reaches (b_run's rows, in order)


@dataclass
class Stream:
    """Layer ``source`` (A), its activation ``poly`` (P), and P's one reader ``reader`` (B)."""

    source: int
    poly: int
    reader: int
    term: int  # B's term that reads P
    chunks: list[StreamChunk]
    rest: AffineRun  # B without that term, bias included: what B adds at its own turn


def plan_streams(
    plan: BatchPlan,
    moduli: list[list[int]],
    sizes: dict[int, int],
    budget: int = STREAM_BYTES,
) -> dict[int, Stream]:
    """Return the streams worth running, by A's index.

    Args:
        plan: the plan.
        moduli: the primes of every level.
        sizes: the polynomials per ciphertext of every value.
        budget: stream layers whose outputs and activations exceed this many bytes, in
            chunks of about this many.
    """
    readers = plan.readers()
    degree = plan.params.poly_modulus_degree
    streams: dict[int, Stream] = {}
    targets: set[int] = set()
    for index, poly in enumerate(plan.layers):
        if not isinstance(poly, BatchPoly) or len(readers[index]) != 1:
            continue
        source, reader = poly.source, readers[index][0]
        a, b = plan.layers[source], plan.layers[reader]
        if not isinstance(a, BatchAffine) or not isinstance(b, BatchAffine):
            continue
        if source in targets or reader in targets or not a.terms or not a.rows:
            continue  # A is computed from whole values; B accumulates one stream
        row_bytes = (2 * len(moduli[a.level]) + 3 * len(moduli[a.level + a.rescales])) * degree * 8
        if a.rows * row_bytes <= budget:
            continue
        (term,) = [t for t, term in enumerate(b.terms) if term.source == index]
        rows_per_chunk = max(1, budget // row_bytes)
        streams[source] = _stream(plan, source, index, reader, term, rows_per_chunk, moduli, sizes)
        targets.add(reader)
    return streams


def _stream(
    plan: BatchPlan,
    source: int,
    poly: int,
    reader: int,
    term: int,
    rows_per_chunk: int,
    moduli: list[list[int]],
    sizes: dict[int, int],
) -> Stream:
    a, b = plan.layers[source], plan.layers[reader]
    assert isinstance(a, BatchAffine) and isinstance(b, BatchAffine)
    read = b.terms[term]
    units = np.asarray(read.inputs, dtype=np.int64)
    size = max(sizes[t.source] for t in b.terms)
    order, _ = tiles_for(a.terms[0].weights)
    chunks = []
    for start in range(0, a.rows, rows_per_chunk):
        rows = np.sort(order[start : start + rows_per_chunk])
        terms, columns = [], []
        for t, a_term in enumerate(a.terms):
            weights = a_term.weights[rows]
            used = np.flatnonzero(np.any(weights != 0, axis=0))
            if used.size:
                terms.append(replace(a_term, weights=weights[:, used], inputs=tuple(used)))
                columns.append((t, used))
        part = replace(a, terms=tuple(terms), bias=a.bias[rows], description="a chunk")
        a_run = prepare_affine(part, [sizes[t.source] for t in terms], moduli[a.level], a.level)
        mine = np.flatnonzero(np.isin(units, rows))
        weights = read.weights[:, mine]
        reached = np.flatnonzero(np.any(weights != 0, axis=1))
        b_run = None
        if mine.size and reached.size:
            share = BatchAffine(
                terms=(replace(read, weights=weights[reached], inputs=tuple(mine)),),
                bias=np.zeros(reached.size),
                level=b.level,
                scale=b.scale,
                rescales=0,
                description="a chunk's share",
            )
            b_run = prepare_affine(share, [sizes[poly]], moduli[b.level], b.level, size=size)
        positions = np.searchsorted(rows, units[mine])
        chunks.append(StreamChunk(a_run, columns, b_run, positions, reached))
    others = tuple(t for i, t in enumerate(b.terms) if i != term)
    rest = prepare_affine(
        replace(b, terms=others),
        [sizes[t.source] for t in others],
        moduli[b.level],
        b.level,
        size=size,
    )
    return Stream(source, poly, reader, term, chunks, rest)
