"""Activations on ciphertexts: element-wise polynomials of degree 2 to 4 (``BatchPoly``)."""

from __future__ import annotations

from dataclasses import dataclass

import tenseal.sealapi as seal

from he_service.engine.batch.errors import BatchEvaluationError
from he_service.engine.batch.plan import BatchPoly

__all__ = ["PolyRun", "activation_scale", "evaluate_activation", "prepare_activation"]


@dataclass
class PolyRun:
    """An activation bound to its level: the sign of its top term, lower terms, constant."""

    poly: BatchPoly
    output_scale: float
    negate: bool
    terms: dict[int, seal.Plaintext]  # power -> coefficient at output_scale / input scale^power
    constant: seal.Plaintext | None


def _powers(scale: float) -> list[float]:
    """Return the scales of x^0 .. x^4 as SEAL's products compute them (x^4 = (x^2)^2)."""
    powers = [1.0, scale, scale * scale]
    return [*powers, powers[2] * scale, powers[2] * powers[2]]


def activation_scale(poly: BatchPoly, scale: float) -> float:
    """Return the exact scale of an activation's output whose input has this scale."""
    return _powers(scale)[poly.degree] / abs(poly.coeffs[-1])


def prepare_activation(
    poly: BatchPoly, scale: float, parms_id: list[int], encoder: seal.CKKSEncoder
) -> PolyRun:
    """Encode an activation's lower coefficients for inputs at this scale and level."""
    powers = _powers(scale)
    lead = poly.coeffs[-1]
    output = activation_scale(poly, scale)
    terms = {
        i: _scalar(encoder, c, parms_id, output / powers[i])
        for i, c in enumerate(poly.coeffs[:-1])
        if i and c
    }
    constant = _scalar(encoder, poly.coeffs[0], parms_id, output) if poly.coeffs[0] else None
    return PolyRun(poly, output, lead < 0, terms, constant)


def _scalar(
    encoder: seal.CKKSEncoder, value: float, parms_id: list[int], scale: float
) -> seal.Plaintext:
    plain = seal.Plaintext()
    encoder.encode(float(value), parms_id, scale, plain)
    return plain


def evaluate_activation(
    evaluator: seal.Evaluator,
    vector: list[seal.Ciphertext],
    run: PolyRun,
    relin_keys: seal.RelinKeys,
    *,
    consume: bool = False,
) -> list[seal.Ciphertext]:
    """Apply the activation to every ciphertext; a square is left unrelinearized (size 3).

    With ``consume``, each input is released from ``vector`` as soon as its output exists,
    so that memory holds one layer and a ciphertext, not two layers.
    """
    degree = run.poly.degree
    out: list[seal.Ciphertext] = []
    for index in range(len(vector)):
        x = vector[index]
        if consume:
            vector[index] = None
        square = seal.Ciphertext()
        evaluator.square(x, square)
        powers = {1: x, 2: square}
        if degree == 2:
            top = square  # left at 3 polynomials: the next affine map works on those
        else:
            evaluator.relinearize_inplace(square, relin_keys)
            top = seal.Ciphertext()
            if degree == 3:
                evaluator.multiply(square, x, top)
            else:
                evaluator.square(square, top)
            if 3 in run.terms:
                powers[3] = seal.Ciphertext()
                evaluator.multiply(square, x, powers[3])
        if run.negate:
            evaluator.negate_inplace(top)
        top.scale = run.output_scale  # x^d at S^d is a_d x^d at S^d / |a_d|
        for power, plain in run.terms.items():
            term = seal.Ciphertext()
            evaluator.multiply_plain(powers[power], plain, term)
            # Equal up to the last bit of the double scale arithmetic.
            if abs(term.scale - top.scale) > 1e-9 * top.scale:
                raise BatchEvaluationError("internal scale mismatch in an activation")
            term.scale = top.scale
            evaluator.add_inplace(top, term)
        if run.constant is not None:
            evaluator.add_plain_inplace(top, run.constant)
        out.append(top)
    return out
