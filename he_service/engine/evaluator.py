"""Run a plan on ciphertexts with Microsoft SEAL (``tenseal.sealapi``).

Weights are encoded once, at the level and scale where they are used, when the model loads,
so a request only multiplies, adds, rotates, relinearizes and rescales. The rotation schedules
are the ones the compiler simulated (``schedule.py``), run on a SEAL backend; a rotation by a
step without its own key is the sequence of key steps the plan's ``KeyPlan`` gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.methods import GatherInput, TermPlan
from he_service.engine.plan import LinearStep, Plan, PolyApply
from he_service.engine.poly import CubicStep, PolyStep, SquareStep
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
class _EncodedTerm:
    term: TermPlan
    plaintexts: list[seal.Plaintext | None]  # None: the weights rounded to zero at this scale


@dataclass
class _EncodedLinear:
    step: LinearStep
    terms: list[_EncodedTerm]
    bias: seal.Plaintext | None
    parms_id: list[int]
    scale: float  # of the products: the input scale times the weight scale


@dataclass
class _EncodedPoly:
    """Constants of a polynomial step, encoded at the level and scale where they are used."""

    step: PolyApply
    k: seal.Plaintext | None = None  # added one level down (k, or the cubic's c2)
    m: seal.Plaintext | None = None  # multiplies x, landing on the output scale (m or c1)
    c3: seal.Plaintext | None = None  # multiplies x, landing on the scale of x^2
    output_scale: float = 0.0


_Value: TypeAlias = seal.Ciphertext | None


class _SealBackend:
    """The schedule backend: SEAL calls, composed rotations, pre-encoded plaintexts.

    A plaintext whose weights all rounded to zero is never multiplied (SEAL refuses to make a
    transparent ciphertext); its product is ``None``, which rotations and sums pass over.
    """

    def __init__(self, evaluator: EncryptedEvaluator, galois: seal.GaloisKeys | None) -> None:
        self.ev = evaluator._evaluator
        self.keys = evaluator.plan.keys
        self.slots = evaluator.plan.params.slot_count
        self.galois = galois
        self.plaintexts: list[seal.Plaintext | None] = []

    def rotate(self, value: _Value, step: int, *, on_product: bool) -> _Value:
        if value is None:
            return None
        if self.galois is None:
            raise EvaluationError("the plan rotates but no Galois keys were given")
        for hop in self.keys.hops(step % self.slots):
            out = seal.Ciphertext()
            self.ev.rotate_vector(value, hop, self.galois, out)
            value = out
        return value

    def add(self, a: _Value, b: _Value) -> _Value:
        if a is None or b is None:
            return b if a is None else a
        out = seal.Ciphertext()
        self.ev.add(a, b, out)
        return out

    def multiply(self, value: _Value, diagonal: int) -> _Value:
        plain = self.plaintexts[diagonal]
        if value is None or plain is None:
            return None
        out = seal.Ciphertext()
        self.ev.multiply_plain(value, plain, out)
        return out


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
        self._levels = [d.parms_id() for d in levels]
        self.input_parms_id = self._levels[0]
        self.input_scale = plan.params.scale

        self._primes = [float(d.parms().coeff_modulus()[-1].value()) for d in levels]
        prime = self._primes.__getitem__

        # Values at rest (inputs, activation outputs) all have the input scale: each linear
        # step's weight scale is chosen so that the activation after it lands exactly there
        # (x^2: (s w)^2 / p; cubic and quartic: a square of a square, (s w)^4 / (p1^2 p2)).
        consumer = {s.source: s for s in plan.steps if isinstance(s, PolyApply)}
        scale = self.input_scale
        self._encoded: list[_EncodedLinear | _EncodedPoly] = []
        self._product_scale: dict[int, float] = {}
        for step in plan.steps:
            if isinstance(step, PolyApply):
                self._encoded.append(self._encode_poly(step, self._product_scale[step.source]))
                continue
            level = step.level
            after = consumer.get(step.node)
            if after is None:
                weight_scale = float(2**plan.last_weight_bits)
            elif isinstance(after.step, SquareStep):
                weight_scale = (prime(level) * scale) ** 0.5 / scale
            else:
                weight_scale = (prime(level) ** 2 * prime(level + 1) * scale) ** 0.25 / scale
            parms_id = self._levels[level]
            terms = [
                _EncodedTerm(
                    term, [self._weights(p, parms_id, weight_scale) for p in _plaintexts(term)]
                )
                for term in step.terms
            ]
            if all(p is None for t in terms for p in t.plaintexts):
                raise EvaluationError(
                    f"every weight of {step.description} rounds to zero at a {weight_scale:.3g} "
                    "weight scale"
                )
            product_scale = scale * weight_scale
            self._product_scale[step.node] = product_scale
            bias = self._encode(step.bias, parms_id, product_scale) if np.any(step.bias) else None
            self._encoded.append(_EncodedLinear(step, terms, bias, parms_id, product_scale))
        last = plan.steps[-1]
        assert isinstance(last, LinearStep)
        self.output_scale = self._product_scale[last.node]

    def _encode_poly(self, step: PolyApply, scale: float) -> _EncodedPoly:
        prime = self._primes.__getitem__
        level = step.level
        squared = (scale * scale) / prime(level)
        encoded = _EncodedPoly(step)
        poly: PolyStep = step.step
        if isinstance(poly, SquareStep):
            encoded.output_scale = squared
            return encoded
        elif isinstance(poly, CubicStep):
            # x^2 (c3 x + c2) + c1 x: c3 x lands on the scale of x^2 after one rescale,
            # c1 x on the output scale after one rescale and a mod switch.
            encoded.output_scale = (squared * squared) / prime(level + 1)
            encoded.k = self._encode_scalar(poly.c2, self._levels[level + 1], squared)
            encoded.c3 = self._encode_scalar(
                poly.c3, self._levels[level], squared * prime(level) / scale
            )
            encoded.m = self._encode_scalar(
                poly.c1, self._levels[level], encoded.output_scale * prime(level) / scale
            )
        else:
            encoded.k = self._encode_scalar(poly.k, self._levels[level + 1], squared)
            encoded.output_scale = (squared * squared) / prime(level + 1)
            # m x must reach output_scale after one rescale by prime(level).
            m_scale = encoded.output_scale * prime(level) / scale
            encoded.m = self._encode_scalar(poly.m, self._levels[level], m_scale)
        return encoded

    def _encode(self, values: np.ndarray, parms_id: list[int], scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self._encoder.encode(values.tolist(), parms_id, scale, plain)
        return plain

    def _weights(
        self, values: np.ndarray, parms_id: list[int], scale: float
    ) -> seal.Plaintext | None:
        plain = self._encode(values, parms_id, scale)
        return None if plain.is_zero() else plain

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
                    f"({self.plan.params.data_primes} primes)"
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
        backend = _SealBackend(self, galois_keys)
        values: dict[int, seal.Ciphertext] = {0: cts[0]}
        readers = _last_reads(self.plan)
        for index, encoded in enumerate(self._encoded):
            start = time.perf_counter()
            if isinstance(encoded, _EncodedLinear):
                values[encoded.step.node] = self._linear(encoded, values, cts, backend)
                timings.add("affine", time.perf_counter() - start)
            else:
                source = values[encoded.step.source]
                values[encoded.step.node] = self._poly(source, encoded, relin_keys)
                timings.add("activation", time.perf_counter() - start)
            for node in readers.get(index, ()):
                values.pop(node, None)  # free ciphertexts no later step reads
        last = self.plan.steps[-1]
        return values[last.node]

    def _linear(
        self,
        encoded: _EncodedLinear,
        values: dict[int, seal.Ciphertext],
        inputs: list[seal.Ciphertext],
        backend: _SealBackend,
    ) -> seal.Ciphertext:
        total: _Value = None
        for term in encoded.terms:
            backend.plaintexts = term.plaintexts
            product = term.term.product
            value: _Value
            if isinstance(product, GatherInput):
                value = None
                for ct, k in zip(inputs, range(len(inputs)), strict=True):
                    value = backend.add(value, backend.multiply(ct, k))
                for fold in product.folds:
                    value = backend.add(value, backend.rotate(value, fold, on_product=True))
            else:
                value = self._at_level(values[term.term.source], encoded.parms_id)
                for window in term.term.pre:
                    value = window.run(value, backend)
                value = product.run(value, backend)
            for window in term.term.post:
                value = window.run(value, backend)
            if value is None:
                continue
            value.scale = _canonical(value.scale, encoded.scale)
            total = backend.add(total, value)
        if total is None:
            raise EvaluationError(f"{encoded.step.description}: every product rounded to zero")
        if encoded.bias is not None:
            self._evaluator.add_plain_inplace(total, encoded.bias)
        return total

    def _at_level(self, ct: seal.Ciphertext, parms_id: list[int]) -> seal.Ciphertext:
        if list(ct.parms_id()) == list(parms_id):
            return ct
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to(ct, parms_id, out)
        return out

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
        step = encoded.step.step
        if isinstance(step, SquareStep):
            squared.scale = _canonical(squared.scale, self.input_scale)
            return squared
        assert encoded.k is not None and encoded.m is not None
        if isinstance(step, CubicStep):
            assert encoded.c3 is not None
            inner = seal.Ciphertext()
            ev.multiply_plain(x, encoded.c3, inner)
            ev.rescale_to_next_inplace(inner)
            inner.scale = _same_scale(inner, squared)
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
        linear.scale = _same_scale(linear, out)
        ev.add_inplace(out, linear)
        out.scale = _canonical(out.scale, self.input_scale)
        return out


def _plaintexts(term: TermPlan) -> list[np.ndarray]:
    product = term.product
    if isinstance(product, GatherInput):
        return list(product.plaintexts)
    return product.plaintexts()


def _last_reads(plan: Plan) -> dict[int, list[int]]:
    """Map step index -> nodes whose value no later step reads."""
    last: dict[int, int] = {}
    for index, step in enumerate(plan.steps):
        sources = [step.source] if isinstance(step, PolyApply) else [t.source for t in step.terms]
        for source in sources:
            last[source] = index
    result: dict[int, list[int]] = {}
    for node, index in last.items():
        result.setdefault(index, []).append(node)
    return result


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * abs(b)


def _canonical(scale: float, expected: float) -> float:
    """Return ``expected`` for a scale equal to it up to double rounding.

    Values at rest all carry the input scale and products the input scale times their step's
    weight scale; SEAL's arithmetic reaches them up to the last bit, and SEAL adds only
    ciphertexts (and plaintexts) of bit-identical scales.
    """
    if not _close(scale, expected):
        raise EvaluationError("internal scale mismatch")
    return expected


def _same_scale(ct: seal.Ciphertext, reference: seal.Ciphertext) -> float:
    """Return the reference scale, which ``ct`` has up to double rounding (SEAL wants both
    identical before an addition)."""
    if not _close(ct.scale, reference.scale):
        raise EvaluationError("internal scale mismatch")
    return float(reference.scale)
