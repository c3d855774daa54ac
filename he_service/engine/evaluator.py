"""Run a plan on ciphertexts with Microsoft SEAL (``tenseal.sealapi``).

Weights are encoded once, at the level and scale where they are used, when the model loads:
a diagonal is encoded at scale ``q`` (the prime the next rescale drops), so a linear layer
leaves the ciphertext scale unchanged and biases can be encoded ahead of time as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.plan import AffineStep, CubicStep, Plan, PolyStep, SquareStep
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
    step: AffineStep
    terms: dict[tuple[int, int], seal.Plaintext]
    bias: seal.Plaintext


@dataclass
class _EncodedPoly:
    """Constants of a polynomial step, encoded at the level and scale where they are added."""

    step: PolyStep
    k: seal.Plaintext | None = None  # added to x^2 (one level down)
    m: seal.Plaintext | None = None  # multiplies x, landing on the scale of (x^2 + k)^2
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
        scale = self.input_scale
        level = 0
        self._encoded: list[_EncodedAffine | _EncodedPoly] = []

        def prime(at: int) -> float:
            return float(levels[at].parms().coeff_modulus()[-1].value())

        # Scales are tracked with the same double arithmetic SEAL uses (multiply, then
        # divide by the dropped prime), so constants can be encoded ahead of time.
        for step in plan.steps:
            if isinstance(step, AffineStep):
                terms = {
                    key: self._encode(diag, levels[level].parms_id(), prime(level))
                    for key, diag in step.terms.items()
                }
                scale = (scale * prime(level)) / prime(level)
                bias = self._encode(step.bias, levels[level + 1].parms_id(), scale)
                self._encoded.append(_EncodedAffine(step, terms, bias))
                level += 1
                continue
            squared = (scale * scale) / prime(level)
            encoded = _EncodedPoly(step)
            if isinstance(step, SquareStep):
                encoded.output_scale = squared
            elif isinstance(step, CubicStep):
                encoded.k = self._encode_scalar(step.k, levels[level + 1].parms_id(), squared)
                encoded.output_scale = (scale * squared) / prime(level + 1)
            else:
                encoded.k = self._encode_scalar(step.k, levels[level + 1].parms_id(), squared)
                encoded.output_scale = (squared * squared) / prime(level + 1)
                # m x must reach output_scale after one rescale by prime(level).
                m_scale = encoded.output_scale * prime(level) / scale
                encoded.m = self._encode_scalar(step.m, levels[level].parms_id(), m_scale)
            scale = encoded.output_scale
            self._encoded.append(encoded)
            level += step.levels
        self.output_scale = scale

    def _encode(self, values: np.ndarray, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(values.tolist(), parms_id, scale, plain)
        return plain

    def _encode_scalar(self, value: float, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(float(value), parms_id, scale, plain)
        return plain

    def check_input(self, ct: seal.Ciphertext) -> None:
        """Refuse a ciphertext at the wrong level, scale or size.

        Raises:
            EvaluationError: with what was expected.
        """
        if ct.is_transparent():
            raise EvaluationError("ciphertext is transparent (not encrypted); encrypt the input")
        if ct.size() != 2:
            raise EvaluationError(f"ciphertext has {ct.size()} polynomials; a fresh one has 2")
        if list(ct.parms_id()) != list(self.input_parms_id):
            raise EvaluationError(
                f"ciphertext is at the wrong level ({ct.coeff_modulus_size()} primes); encrypt "
                f"at the top level of the card's parameters "
                f"({len(self.plan.params.coeff_modulus_bits) - 1} primes)"
            )
        if ct.scale != self.input_scale:
            raise EvaluationError(
                f"ciphertext scale is {ct.scale:.6g}; the card asks for 2^"
                f"{self.plan.params.scale_bits}"
            )

    def evaluate(
        self,
        ct: seal.Ciphertext,
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings | None = None,
    ) -> seal.Ciphertext:
        """Evaluate the plan on one checked input ciphertext.

        Args:
            ct: the input, checked by ``check_input``.
            relin_keys: the caller's relinearization keys.
            galois_keys: the caller's Galois keys for ``plan.galois_steps`` (None if none needed).
            timings: where to add seconds per layer kind.

        Returns:
            The output ciphertext (outputs in the decoded slots, zeros elsewhere).
        """
        timings = timings or Timings()
        for encoded in self._encoded:
            start = time.perf_counter()
            if isinstance(encoded, _EncodedAffine):
                ct = self._affine(ct, encoded, galois_keys)
                timings.add("affine", time.perf_counter() - start)
            else:
                ct = self._poly(ct, encoded, relin_keys)
                timings.add("activation", time.perf_counter() - start)
        return ct

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
        assert encoded.k is not None
        ev.add_plain_inplace(squared, encoded.k)
        if isinstance(encoded.step, CubicStep):
            lowered = seal.Ciphertext()
            ev.mod_switch_to_next(x, lowered)
            out = seal.Ciphertext()
            ev.multiply(lowered, squared, out)
            ev.relinearize_inplace(out, relin_keys)
            ev.rescale_to_next_inplace(out)
            return out
        out = self._square(squared, relin_keys)
        assert encoded.m is not None
        linear = seal.Ciphertext()
        ev.multiply_plain(x, encoded.m, linear)
        ev.rescale_to_next_inplace(linear)
        ev.mod_switch_to_next_inplace(linear)
        # Equal up to rounding of the double scale arithmetic; SEAL wants them identical.
        if abs(linear.scale - out.scale) > 1e-9 * out.scale:
            raise EvaluationError("internal scale mismatch in a quartic activation")
        linear.scale = out.scale
        ev.add_inplace(out, linear)
        return out

    def _affine(
        self, ct: seal.Ciphertext, encoded: _EncodedAffine, galois_keys: seal.GaloisKeys | None
    ) -> seal.Ciphertext:
        ev, step = self._evaluator, encoded.step
        rotate = _rotator(ev, galois_keys)
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
        ev.rescale_to_next_inplace(total)
        for fold in step.fold_steps:
            ev.add_inplace(total, rotate(total, fold))
        ev.add_plain_inplace(total, encoded.bias)
        return total


def _rotator(
    ev: seal.Evaluator, galois_keys: seal.GaloisKeys | None
) -> Callable[[seal.Ciphertext, int], seal.Ciphertext]:
    def rotate(ct: seal.Ciphertext, step: int) -> seal.Ciphertext:
        if galois_keys is None:
            raise EvaluationError("the plan rotates but no Galois keys were given")
        out = seal.Ciphertext()
        ev.rotate_vector(ct, step, galois_keys, out)
        return out

    return rotate
