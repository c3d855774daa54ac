"""Run a plan on ciphertexts with Microsoft SEAL (``tenseal.sealapi``).

Weights are encoded once, at the level and scale where they are used, when the model loads,
so a request only multiplies, adds, rotates, relinearizes and rescales.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.plan import AffineStep, CubicStep, InputStep, Plan, PolyStep, SquareStep
from he_service.protocol.params import seal_context

__all__ = ["EncryptedEvaluator", "EvaluationError", "Timings"]


class EvaluationError(ValueError):
    """A ciphertext or key set does not fit the plan (level, scale, size, missing keys)."""


@dataclass
class Timings:
    """Seconds spent per named stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


@dataclass
class _EncodedAffine:
    step: AffineStep | InputStep
    terms: dict[tuple[int, int], seal.Plaintext]  # InputStep: keyed (ciphertext, 0)
    bias: seal.Plaintext


@dataclass
class _EncodedPoly:
    """Constants of a polynomial step, encoded at the level and scale where they are used."""

    step: PolyStep
    k: seal.Plaintext | None = None  # added one level down (k, or the cubic's c2)
    m: seal.Plaintext | None = None  # multiplies x, landing on the output scale (m or c1)
    c3: seal.Plaintext | None = None  # multiplies x, landing on the scale of x^2
    output_scale: float = 0.0


class EncryptedEvaluator:
    """A plan bound to SEAL objects, with every plaintext pre-encoded."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.context = seal_context(plan.params)
        self._encoder = seal.CKKSEncoder(self.context)
        self._evaluator = seal.Evaluator(self.context)
        levels = []
        data = self.context.first_context_data()
        while data is not None:
            levels.append(data)
            data = data.next_context_data()
        if len(levels) < plan.depth + 1:
            raise EvaluationError("parameters hold fewer levels than the plan needs")
        self.input_parms_id = levels[0].parms_id()
        self.input_scale = plan.params.scale
        self._encoded: list[_EncodedAffine | _EncodedPoly] = []

        def prime(at: int) -> float:
            return float(levels[at].parms().coeff_modulus()[-1].value())

        # Scales are tracked with the same double arithmetic SEAL uses (multiply, then divide
        # by the dropped prime), so every constant can be encoded ahead of time. An affine map
        # does not rescale: its weight scale is chosen so that the activation after it ends
        # exactly at the input scale (x^2: (s w)^2 / p1; cubic and quartic: a square of a
        # square, (s w)^4 / (p1^2 p2)).
        scale, level = self.input_scale, 0
        for index, step in enumerate(plan.steps):
            if isinstance(step, InputStep | AffineStep):
                if index == len(plan.steps) - 1:
                    weight_scale = float(2**plan.last_weight_bits)
                else:
                    after = plan.steps[index + 1]
                    if isinstance(after, SquareStep):
                        target, degree = prime(level), 2
                    else:
                        target, degree = prime(level) ** 2 * prime(level + 1), 4
                    weight_scale = (target * self.input_scale) ** (1.0 / degree) / scale
                parms_id = levels[level].parms_id()
                if isinstance(step, InputStep):
                    diagonals = {(k, 0): p for k, p in enumerate(step.plaintexts)}
                else:
                    diagonals = step.terms
                terms = {
                    key: self._encode(diag, parms_id, weight_scale)
                    for key, diag in diagonals.items()
                }
                scale *= weight_scale
                bias = self._encode(step.bias, parms_id, scale)
                self._encoded.append(_EncodedAffine(step, terms, bias))
                continue
            squared = (scale * scale) / prime(level)
            encoded = _EncodedPoly(step)
            if isinstance(step, SquareStep):
                encoded.output_scale = squared
            elif isinstance(step, CubicStep):
                # x^2 (c3 x + c2) + c1 x: c3 x lands on the scale of x^2 after one rescale,
                # c1 x on the output scale after one rescale and a mod switch.
                encoded.output_scale = (squared * squared) / prime(level + 1)
                encoded.k = self._encode_scalar(step.c2, levels[level + 1].parms_id(), squared)
                encoded.c3 = self._encode_scalar(
                    step.c3, levels[level].parms_id(), squared * prime(level) / scale
                )
                encoded.m = self._encode_scalar(
                    step.c1, levels[level].parms_id(), encoded.output_scale * prime(level) / scale
                )
            else:
                encoded.k = self._encode_scalar(step.k, levels[level + 1].parms_id(), squared)
                encoded.output_scale = (squared * squared) / prime(level + 1)
                # m x must reach output_scale after one rescale by prime(level).
                m_scale = encoded.output_scale * prime(level) / scale
                encoded.m = self._encode_scalar(step.m, levels[level].parms_id(), m_scale)
            scale = encoded.output_scale
            self._encoded.append(encoded)
            level += step.primes
        self.output_scale = scale

    def _encode(self, values: np.ndarray, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(values.tolist(), parms_id, scale, plain)
        return plain

    def _encode_scalar(self, value: float, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(float(value), parms_id, scale, plain)
        return plain

    def check_inputs(self, cts: list[seal.Ciphertext]) -> None:
        """Refuse a sample of the wrong ciphertext count, level, scale or size.

        Raises:
            EvaluationError: with what was expected.
        """
        expected = self.plan.input_ciphertexts
        if len(cts) != expected:
            raise EvaluationError(
                f"a sample is {expected} ciphertexts for this model, got {len(cts)}"
            )
        for ct in cts:
            if ct.is_transparent():
                raise EvaluationError(
                    "ciphertext is transparent (not encrypted); encrypt the input"
                )
            if ct.size() != 2:
                raise EvaluationError(f"ciphertext has {ct.size()} polynomials; a fresh one has 2")
            if not ct.is_ntt_form():
                raise EvaluationError("ciphertext is not in NTT form; encrypt it with CKKS")
            if list(ct.parms_id()) != list(self.input_parms_id):
                raise EvaluationError(
                    f"ciphertext is at the wrong level ({ct.coeff_modulus_size()} primes); "
                    "encrypt at the top level of the card's parameters "
                    f"({len(self.plan.params.coeff_modulus_bits) - 1} primes)"
                )
            if ct.scale != self.input_scale:
                raise EvaluationError(
                    f"ciphertext scale is {ct.scale:.6g}; the card asks for 2^"
                    f"{self.plan.params.scale_bits}"
                )

    def evaluate(
        self,
        cts: list[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings | None = None,
    ) -> seal.Ciphertext:
        """Evaluate the plan on one sample's checked input ciphertexts.

        Args:
            cts: the sample, checked by ``check_inputs``.
            relin_keys: the caller's relinearization keys.
            galois_keys: the caller's Galois keys for ``plan.galois_steps`` (None if none needed).
            timings: where to add seconds per layer kind.

        Returns:
            The output ciphertext (outputs as the card's decoding says, zeros elsewhere).
        """
        timings = timings or Timings()
        rotate = _rotator(self._evaluator, galois_keys, self.plan.params.slot_count)
        start = time.perf_counter()
        first = self._encoded[0]
        assert isinstance(first, _EncodedAffine)
        ct = self._input(cts, first, rotate)
        timings.add("affine", time.perf_counter() - start)
        for encoded in self._encoded[1:]:
            start = time.perf_counter()
            if isinstance(encoded, _EncodedAffine):
                ct = self._affine(ct, encoded, rotate)
                timings.add("affine", time.perf_counter() - start)
            else:
                ct = self._poly(ct, encoded, relin_keys)
                timings.add("activation", time.perf_counter() - start)
        return ct

    def _input(
        self, cts: list[seal.Ciphertext], encoded: _EncodedAffine, rotate: _Rotate
    ) -> seal.Ciphertext:
        ev = self._evaluator
        total = seal.Ciphertext()
        ev.multiply_plain(cts[0], encoded.terms[(0, 0)], total)
        for k, ct in enumerate(cts[1:], start=1):
            product = seal.Ciphertext()
            ev.multiply_plain(ct, encoded.terms[(k, 0)], product)
            ev.add_inplace(total, product)
        return self._finish(total, encoded, rotate)

    def _finish(
        self, total: seal.Ciphertext, encoded: _EncodedAffine, rotate: _Rotate
    ) -> seal.Ciphertext:
        for fold in encoded.step.fold_steps:
            self._evaluator.add_inplace(total, rotate(total, fold))
        self._evaluator.add_plain_inplace(total, encoded.bias)
        return total

    def _square(self, ct: seal.Ciphertext, relin_keys: seal.RelinKeys) -> seal.Ciphertext:
        ev = self._evaluator
        out = seal.Ciphertext()
        ev.square(ct, out)
        ev.relinearize_inplace(out, relin_keys)
        ev.rescale_to_next_inplace(out)
        return out

    def _poly(
        self, x: seal.Ciphertext, encoded: _EncodedPoly, relin_keys: seal.RelinKeys
    ) -> seal.Ciphertext:
        ev = self._evaluator
        squared = self._square(x, relin_keys)
        if isinstance(encoded.step, SquareStep):
            return squared
        assert encoded.k is not None and encoded.m is not None
        if isinstance(encoded.step, CubicStep):
            assert encoded.c3 is not None
            inner = seal.Ciphertext()
            ev.multiply_plain(x, encoded.c3, inner)
            ev.rescale_to_next_inplace(inner)
            inner.scale = self._same_scale(inner, squared)
            ev.add_plain_inplace(inner, encoded.k)
            out = seal.Ciphertext()
            ev.multiply(squared, inner, out)
            ev.relinearize_inplace(out, relin_keys)
            ev.rescale_to_next_inplace(out)
        else:
            ev.add_plain_inplace(squared, encoded.k)
            out = self._square(squared, relin_keys)
        linear = seal.Ciphertext()
        ev.multiply_plain(x, encoded.m, linear)
        ev.rescale_to_next_inplace(linear)
        ev.mod_switch_to_next_inplace(linear)
        linear.scale = self._same_scale(linear, out)
        ev.add_inplace(out, linear)
        return out

    @staticmethod
    def _same_scale(ct: seal.Ciphertext, reference: seal.Ciphertext) -> float:
        """Return the reference scale, which ``ct`` has up to double rounding (SEAL wants both
        identical before an addition)."""
        if abs(ct.scale - reference.scale) > 1e-9 * reference.scale:
            raise EvaluationError("internal scale mismatch in a polynomial activation")
        return float(reference.scale)

    def _affine(
        self, ct: seal.Ciphertext, encoded: _EncodedAffine, rotate: _Rotate
    ) -> seal.Ciphertext:
        ev, step = self._evaluator, encoded.step
        assert isinstance(step, AffineStep)
        babies = {b: ct if b == 0 else rotate(ct, step.stride * b) for b in step.baby_steps}
        total: seal.Ciphertext | None = None
        for giant in step.giant_steps:
            inner: seal.Ciphertext | None = None
            for (g, b), plain in encoded.terms.items():
                if g != giant:
                    continue
                product = seal.Ciphertext()
                ev.multiply_plain(babies[b], plain, product)
                if inner is None:
                    inner = product
                else:
                    ev.add_inplace(inner, product)
            assert inner is not None
            if giant:
                inner = rotate(inner, step.stride * step.baby_count * giant)
            if total is None:
                total = inner
            else:
                ev.add_inplace(total, inner)
        assert total is not None
        return self._finish(total, encoded, rotate)


_Rotate = Callable[[seal.Ciphertext, int], seal.Ciphertext]


def _rotator(ev: seal.Evaluator, galois_keys: seal.GaloisKeys | None, slots: int) -> _Rotate:
    def rotate(ct: seal.Ciphertext, step: int) -> seal.Ciphertext:
        if galois_keys is None:
            raise EvaluationError("the plan rotates but no Galois keys were given")
        out = seal.Ciphertext()
        # Steps are kept in [0, slots): a right rotation by k is a left rotation by slots - k.
        ev.rotate_vector(ct, step % slots, galois_keys, out)
        return out

    return rotate
