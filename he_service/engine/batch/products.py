"""Exact integer matrix products modulo a prime, run as float64 BLAS products.

Float64 products are exact below 2^53: coefficients are cut into chunks of at most 32 bits,
fewer when a layer's row sums of |W| exceed 2^21, and the chunk products are put back together
modulo the prime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from he_service.engine.graph import CompileError

__all__ = [
    "MAX_CHUNK_BITS",
    "Tile",
    "chunk_bits",
    "combine_chunks",
    "largest_row_sum",
    "reduce_mod",
    "shift_mod",
    "split_chunks",
    "tile_products",
    "tiles_for",
]

_EXACT_BITS = 53
MAX_CHUNK_BITS = 32
# A product of r rows over a span of c columns costs about (r + _ROW_OVERHEAD) * c: small
# products run far below BLAS peak (measured at N=8192 on 2 cores).
_ROW_OVERHEAD = 8


@dataclass
class Tile:
    """One dense product: ``weights @ x[start:stop]`` fills rows ``[first, last)``.

    Rows are numbered in the layer's tile order (``AffineRun.order``), so that every tile
    writes a contiguous block of one output buffer.
    """

    first: int
    last: int
    start: int
    stop: int
    weights: np.ndarray


def largest_row_sum(weights: np.ndarray) -> float:
    """Return the largest row sum of |weights| (0 for no weights)."""
    return float(np.abs(weights).sum(axis=1).max()) if weights.size else 0.0


def chunk_bits(weights: np.ndarray) -> int:
    """Return the widest coefficient chunk whose products with these weights stay exact."""
    largest = largest_row_sum(weights)
    if largest >= 2.0 ** (_EXACT_BITS - 1):
        raise CompileError("integer weights too large for exact products; use fewer weight bits")
    return int(min(MAX_CHUNK_BITS, math.floor(_EXACT_BITS - math.log2(max(largest, 1.0)))))


def tiles_for(weights: np.ndarray) -> tuple[np.ndarray, list[Tile]]:
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
    tiles: list[Tile] = []
    order: list[int] = []
    for rows, lo, hi in blocks:
        block = np.ascontiguousarray(weights[np.asarray(rows), lo:hi])
        tiles.append(Tile(len(order), len(order) + len(rows), lo, hi, block))
        order += rows
    order += [int(r) for r in np.flatnonzero(~nonzero.any(axis=1))]
    return np.asarray(order, dtype=np.int64), tiles


def tile_products(tiles: list[Tile], inputs: np.ndarray, out: np.ndarray) -> None:
    """Write every tile's product into its rows of ``out`` (rows of no tile are left alone)."""
    for tile in tiles:
        np.matmul(tile.weights, inputs[tile.start : tile.stop], out=out[tile.first : tile.last])


def split_chunks(coefficients: np.ndarray, bits: int, count: int, out: np.ndarray) -> None:
    """Write ``coefficients`` (N,) as ``count`` rows of ``bits``-bit chunks into ``out``."""
    if bits == MAX_CHUNK_BITS and count == 2:
        out[...] = coefficients.view(np.uint32).reshape(-1, 2).T  # little-endian halves
        return
    mask = np.uint64((1 << bits) - 1)
    for j in range(count):
        out[j] = (coefficients >> np.uint64(bits * j)) & mask


def combine_chunks(
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
        reduce_mod(total, q, spare, out=total)
        np.right_shift(total, shift, out=spare)
        spare *= delta
        total &= (1 << shift) - 1
        total <<= bits
        total += spare
        np.copyto(spare, products[:, j * degree : (j + 1) * degree], casting="unsafe")
        total += spare


def reduce_mod(values: np.ndarray, q: int, spare: np.ndarray, out: np.ndarray) -> None:
    """Set ``out = values mod q`` in [0, q) (int64; ``spare`` is scratch, ``out`` may alias).

    A floor division by a scalar runs as a multiplication (libdivide): 3.6x faster than
    ``np.remainder`` here.
    """
    np.floor_divide(values, q, out=spare)
    spare *= q
    np.subtract(values, spare, out=out)


def shift_mod(values: np.ndarray, shift: int, q: int, spare: np.ndarray) -> None:
    """Set ``values`` (int64 in [0, q)) to ``values * 2^shift mod q``, in place.

    Exact modular arithmetic in steps of at most ``b`` bits, where ``q = 2^b - delta``:
    ``y 2^s = (y >> (b - s)) delta + ((y mod 2^(b - s)) << s)  (mod q)``, each step below
    2^62 as long as ``delta`` has at most ``61 - s`` bits (SEAL's primes sit just below a
    power of two).
    """
    width = q.bit_length()
    delta = (1 << width) - q
    largest = max(1, min(width, 61 - delta.bit_length()))
    while shift > 0:
        step = min(shift, largest)
        np.right_shift(values, width - step, out=spare)
        spare *= delta
        values &= (1 << (width - step)) - 1
        values <<= step
        values += spare
        reduce_mod(values, q, spare, out=values)
        shift -= step
