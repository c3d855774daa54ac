"""Slot layouts and the ways an affine map can move a vector from one layout to the next.

Three layouts appear in a plan:

* *replicated*: element ``i`` sits at slot ``position[i] + k * period`` for every ``k``, and
  every other slot is (near) zero. The first step produces it; so does ``hybrid``.
* *strided*: element ``i`` sits at slot ``position[i]`` only and the other slots hold partial
  sums ("garbage") that later weights multiply by zero. ``window`` produces it: it is the
  cheapest way to shrink a replicated vector, but it must never be the last layer, because the
  garbage is made of weights times inputs and would leak the model to the key owner.

And four ways to evaluate an affine map, each a :class:`~he_service.engine.plan.AffineStep`
(diagonals, then folds) or the :class:`~he_service.engine.plan.InputStep`:

* ``input_step``: the client gathers, into every slot, the input value that slot's weight
  multiplies (an index table in the card), so the first map is plaintext products and
  ``log2(terms per ciphertext)`` folds over whole blocks: its output is replicated.
* ``hybrid``: replicated -> replicated (or the final ``[0, m)`` layout): ``period_out``
  diagonals by baby-step giant-step, then ``log2(period_in / period_out)`` folds.
* ``window``: replicated -> strided: output ``j`` sums a window of ``2^F`` consecutive slots;
  ``period / 2^F`` rotated copies of the input cover every input once, then ``F`` folds.
* ``gather``: strided -> replicated with period ``D``: product ``(o, i)`` lands on slot
  ``position[i] + o``; folds over every multiple of ``D`` sum each output's terms into every
  slot ``o + kD``, so the result is clean (outputs, replicated, and zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from he_service.engine.plan import AffineStep, InputStep

__all__ = ["Layout", "affine_options", "input_step", "next_pow2"]


@dataclass(frozen=True)
class Layout:
    """Where each element of a vector sits (see the module docstring)."""

    period: int
    position: np.ndarray
    clean: bool

    def inverse(self) -> np.ndarray:
        index = np.full(self.period, -1)
        index[self.position] = np.arange(self.position.size)
        return index

    @property
    def key(self) -> tuple[int, bool, bytes]:
        return (self.period, self.clean, self.position.tobytes())


@dataclass(frozen=True)
class InputPlan:
    """The first step plus what the client needs to lay its input out."""

    step: InputStep
    index: np.ndarray  # (ciphertexts, period): input element per slot, -1 for zero
    layout: Layout


def input_step(matrix: np.ndarray, bias: np.ndarray, slots: int) -> InputPlan:
    """Compile the first affine map for a client-gathered input.

    Output ``o`` lives at position ``o`` of blocks of ``B = next_pow2(m)`` slots. Each
    ciphertext holds ``E`` blocks; block ``e`` of ciphertext ``c`` carries, at position ``o``,
    the ``(c * E + e)``-th input that output ``o`` reads. Summing the ciphertexts and folding
    the ``E`` blocks gives every output in every block. The client repeats its ``B * E`` slots
    to fill the ciphertext, so the folds are cyclic and the result clean.
    """
    m = matrix.shape[0]
    block = next_pow2(m)
    supports = [np.flatnonzero(row) for row in matrix]
    terms = max(1, max(s.size for s in supports))
    per_ct = min(next_pow2(terms), slots // block)
    count = -(-terms // per_ct)
    period = block * per_ct
    index = np.full((count, period), -1)
    weights = np.zeros((count, period))
    for o, support in enumerate(supports):
        for t, i in enumerate(support):
            c, e = divmod(t, per_ct)
            index[c, e * block + o] = i
            weights[c, e * block + o] = matrix[o, i]
    copies = slots // period
    folds = tuple(block << k for k in range(int(math.log2(per_ct))))
    bias_slots = np.tile(np.concatenate([bias, np.zeros(block - m)]), slots // block)
    step = InputStep(
        plaintexts=tuple(np.tile(w, copies) for w in weights),
        bias=bias_slots,
        fold_steps=folds,
        description=f"input {matrix.shape[1]}->{m} ({count} ciphertexts, fold {len(folds)})",
    )
    return InputPlan(step, index, Layout(block, np.arange(m), clean=True))


def affine_options(
    matrix: np.ndarray, bias: np.ndarray, inp: Layout, slots: int, *, last: bool
) -> list[tuple[AffineStep, Layout]]:
    """Return every applicable way to evaluate ``matrix @ x + bias`` from layout ``inp``."""
    m = matrix.shape[0]
    options: list[tuple[AffineStep, Layout]] = []
    if inp.clean:
        if last:
            out = Layout(slots, np.arange(m), clean=True)
        else:
            out = Layout(max(next_pow2(m), 1), np.arange(m), clean=True)
        options.append((_hybrid(matrix, bias, inp, out, slots), out))
        if not last:
            width = 1
            while width <= inp.period and width * m <= slots:
                if width > 1:
                    options.append(_window(matrix, bias, inp, width, slots))
                width *= 2
    period = next_pow2(m)
    while period <= slots:
        if np.all(inp.position % period == 0):
            options.append(_gather(matrix, bias, inp, period, slots))
        period *= 2
    return options


def _hybrid(
    matrix: np.ndarray, bias: np.ndarray, inp: Layout, out: Layout, slots: int
) -> AffineStep:
    m, n = matrix.shape
    out_index = out.inverse()
    slot = np.arange(slots)
    rows = out_index[slot % out.period]
    bias_slots = np.where(rows >= 0, bias[np.maximum(rows, 0)], 0.0)
    diagonals: dict[int, np.ndarray] = {}
    fold: tuple[int, ...] = ()
    if out.period < inp.period < slots:
        # Only period_out diagonals over the replicated input, then fold the partial sums.
        in_index = inp.inverse()
        for offset in range(out.period):
            cols = in_index[(slot + offset) % inp.period]
            valid = (rows >= 0) & (cols >= 0)
            diag = np.zeros(slots)
            diag[valid] = matrix[rows[valid], cols[valid]]
            if np.any(diag):
                diagonals[offset] = diag
        fold = tuple(out.period << k for k in range(int(math.log2(inp.period // out.period))))
    else:
        # One diagonal per distinct (input slot - output slot) offset that carries a weight,
        # built from the non-zeros only, so a sparse map stays cheap to compile.
        r_idx, c_idx = np.nonzero(matrix)
        copies = slots // out.period
        s = out.position[r_idx][:, None] + out.period * np.arange(copies)[None, :]
        offsets = (inp.position[c_idx][:, None] - s) % inp.period
        values = np.broadcast_to(matrix[r_idx, c_idx][:, None], s.shape)
        for offset in np.unique(offsets):
            mask = offsets == offset
            diag = np.zeros(slots)
            np.add.at(diag, s[mask], values[mask])
            diagonals[int(offset)] = diag
    description = f"hybrid {n}->{m} ({len(diagonals)} diagonals, fold {len(fold)})"
    return _bsgs(diagonals, bias_slots, fold, inp.period, slots, description)


def _window(
    matrix: np.ndarray, bias: np.ndarray, inp: Layout, width: int, slots: int
) -> tuple[AffineStep, Layout]:
    m, n = matrix.shape
    in_index = inp.inverse()
    j = np.arange(m)
    u = np.arange(width)
    diagonals: dict[int, np.ndarray] = {}
    for r in range(0, inp.period, width):
        cols = in_index[(width * j[:, None] + u[None, :] + r) % inp.period]
        diag = np.zeros(slots)
        valid = cols >= 0
        rows = np.broadcast_to(j[:, None], cols.shape)
        diag[(width * rows + u[None, :])[valid]] = matrix[rows[valid], cols[valid]]
        if np.any(diag):
            diagonals[r] = diag
    bias_slots = np.zeros(slots)
    bias_slots[width * j] = bias
    folds = tuple(1 << k for k in range(int(math.log2(width))))
    description = f"window {n}->{m} ({len(diagonals)} diagonals, fold {len(folds)})"
    step = _bsgs(diagonals, bias_slots, folds, inp.period, slots, description)
    return step, Layout(slots, width * j, clean=False)


def _gather(
    matrix: np.ndarray, bias: np.ndarray, inp: Layout, period: int, slots: int
) -> tuple[AffineStep, Layout]:
    m, n = matrix.shape
    diagonals: dict[int, np.ndarray] = {}
    for o in range(m):
        diag = np.zeros(slots)
        diag[inp.position + o] = matrix[o]
        if np.any(diag):
            diagonals[(slots - o) % slots] = diag
    out = Layout(period, np.arange(m), clean=True)
    bias_slots = np.tile(np.concatenate([bias, np.zeros(period - m)]), slots // period)
    folds = tuple(period << k for k in range(int(math.log2(slots // period))))
    description = f"gather {n}->{m} ({len(diagonals)} diagonals, fold {len(folds)})"
    return _bsgs(diagonals, bias_slots, folds, slots, slots, description), out


def _bsgs(
    diagonals: dict[int, np.ndarray],
    bias: np.ndarray,
    folds: tuple[int, ...],
    period: int,
    slots: int,
    description: str,
) -> AffineStep:
    """Put every diagonal on a giant step: multiply first, then rotate the product.

    A baby step would rotate the input at its low scale (2^18), where key-switching noise
    (about 2^24 slot units with these 60-bit primes) swamps it; a product sits at scale times
    weight scale (2^38 and up), where the same noise vanishes. So there are no baby steps, and
    the layouts above keep the number of diagonals small instead.
    """
    if not diagonals:
        diagonals = {0: np.zeros(slots)}
    stride, baby_count = math.gcd(period, *diagonals), 1
    terms: dict[tuple[int, int], np.ndarray] = {}
    for offset, diag in diagonals.items():
        giant, baby = divmod(offset // stride, baby_count)
        terms[(giant, baby)] = np.roll(diag, stride * baby_count * giant)
    return AffineStep(stride, baby_count, terms, bias, folds, description)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
