"""Predict how far encrypted outputs stray from the plaintext network, before paying for it.

The plan is simulated on plain slot vectors with the noise CKKS adds injected where SEAL adds
it, each as a Gaussian of the measured standard deviation (slot units, divided by the scale the
value has at that point):

* encryption: ``3.2 sqrt(N)`` on every input slot;
* rescaling: rounding after the division by a prime, ``0.236 N`` (``sqrt(N/18) sqrt(N)``);
* key switching (rotations): the same rounding floor after the division by the special prime,
  plus ``2^17.2 (N/8192)^2 sqrt(l/3) q/P`` from the key's error times the decomposed digits
  (measured: max errors 2^19.2 at N=8192 with three primes and q = P, 2^22.5 at N=16384 with
  five and q = P/4); a rotation at rest (scale ``2^S``) feels it fully, a rotation of a product
  (scale ``2^(S+W)``) hardly at all;
* encoding: every plaintext slot is rounded by ``sqrt(N / 12)`` over the weight scale, the
  garbage slots' plaintext zeros included.

Errors are measured on unit-normal inputs, a stand-in for preprocessed data; the
``expected_max_logit_error`` this yields is within a small factor of measured errors (a test
checks it on encrypted runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from he_service.engine.methods import GatherInput
from he_service.engine.plan import LinearStep, Plan, PolyApply
from he_service.engine.poly import SquareStep
from he_service.engine.schedule import NumpyBackend

__all__ = ["FRESH", "ROUNDING", "NoiseEstimate", "estimate_noise"]

FRESH = 3.2
ROUNDING = 0.236
_KEY_SWITCH = 2.0**17.2


@dataclass(frozen=True)
class NoiseEstimate:
    """Simulated output errors: their spread and their largest value over the samples."""

    rms: float
    max: float

    def to_json(self) -> dict[str, float]:
        return {
            "expected_rms_logit_error": float(f"{self.rms:.3g}"),
            "expected_max_logit_error": float(f"{self.max:.3g}"),
        }


class _NoisyBackend(NumpyBackend[np.ndarray]):
    def __init__(
        self, plaintexts: list[np.ndarray], rest: float, product: float, rng: np.random.Generator
    ) -> None:
        self.plaintexts = plaintexts
        self.rest, self.product, self.rng = rest, product, rng

    def rotate(self, value: np.ndarray, step: int, *, on_product: bool) -> np.ndarray:
        sigma = self.product if on_product else self.rest
        return np.roll(value, -step) + self.rng.normal(0.0, sigma, value.size)


def estimate_noise(plan: Plan, samples: int = 4, seed: int = 0) -> NoiseEstimate:
    """Return the simulated output error of the plan on unit-normal inputs."""
    rng = np.random.default_rng(seed)
    params = plan.params
    n = params.poly_modulus_degree
    slots = params.slot_count
    scale = params.scale
    primes = [2.0**b for b in params.coeff_modulus_bits]
    special = primes[-1]
    data = primes[:-1]
    rounding = ROUNDING * n
    encode = math.sqrt(n / 12)
    consumer = {s.source: s for s in plan.steps if isinstance(s, PolyApply)}
    errors = []
    length = plan.input_length
    for _ in range(samples):
        x = rng.normal(size=length)
        padded = np.concatenate([x, [0.0]])
        inputs = [
            np.tile(padded[row], slots // plan.input_index.shape[1]) for row in plan.input_index
        ]
        clean = plan.simulate(inputs)
        noisy_inputs = [v + rng.normal(0.0, FRESH * math.sqrt(n) / scale, slots) for v in inputs]
        values: dict[int, np.ndarray] = {0: noisy_inputs[0]}
        for step in plan.steps:
            if isinstance(step, PolyApply):
                out = step.step.simulate(values[step.source])
                rescales = 1 if isinstance(step.step, SquareStep) else 2
                values[step.node] = out + rng.normal(0.0, rescales * rounding / scale, slots)
                continue
            left = len(data) - step.level
            q_max = max(data[:left])
            switch = (
                rounding + _KEY_SWITCH * (n / 8192) ** 2 * math.sqrt(left / 3) * q_max / special
            )
            after = consumer.get(step.node)
            weight = _weight_scale(plan, step, after, data, scale)
            total = step.bias.copy()
            for term in step.terms:
                value: np.ndarray
                product = term.product
                if isinstance(product, GatherInput):
                    value = np.zeros(slots)
                    for p, v in zip(product.plaintexts, noisy_inputs, strict=True):
                        value = value + (p + rng.normal(0.0, encode / weight, slots)) * v
                    for fold in product.folds:
                        value = (
                            value
                            + np.roll(value, -fold)
                            + rng.normal(0.0, switch / (scale * weight), slots)
                        )
                else:
                    plains = [
                        p + rng.normal(0.0, encode / weight, slots) for p in product.plaintexts()
                    ]
                    backend = _NoisyBackend(plains, switch / scale, switch / (scale * weight), rng)
                    value = values[term.source]
                    for window in term.pre:
                        value = window.run(value, backend)
                    value = product.run(value, backend)
                for window in term.post:
                    value = window.run(
                        value, _NoisyBackend([], switch / scale, switch / (scale * weight), rng)
                    )
                total = total + value
            values[step.node] = total
        last = plan.steps[-1]
        noisy = values[last.node]
        errors.append((noisy - clean)[: plan.output_length])
    stacked = np.abs(np.stack(errors))
    return NoiseEstimate(float(np.sqrt(np.mean(stacked**2))), float(stacked.max()))


def _weight_scale(
    plan: Plan, step: LinearStep, after: PolyApply | None, data: list[float], scale: float
) -> float:
    """Return the weight scale the evaluator encodes this step's plaintexts with."""
    if after is None:
        return float(2**plan.last_weight_bits)
    level = step.level
    # SEAL drops the last data prime first: the prime dropped at level t is data[-1 - t].
    first = data[-1 - level]
    if isinstance(after.step, SquareStep):
        return math.sqrt(first * scale) / scale
    second = data[-2 - level]
    return float((first**2 * second * scale) ** 0.25 / scale)
