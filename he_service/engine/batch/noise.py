"""Predict how far a batch plan's encrypted outputs stray from the exact network.

Two errors add up: the integer weights the evaluator uses (deterministic, simulated exactly by
``BatchPlan.simulate(quantised=True)``), and the noise CKKS adds, injected as in the latency
estimate (``he_service.engine.noise``): fresh encryption noise on every input slot and one
rounding per rescale, each a Gaussian in slot units divided by the scale ``2^scale_bits`` that
values come back to. No rotation, so no key-switching noise. Inputs are unit-normal, like the
latency estimate's, and the published figure is ``PUBLISHED`` times the simulated maximum, as
for the latency plan (measured encrypted errors: mnist-cnn 1.1x the simulated maximum on 512
test images, breast-cancer-mlp 1.1x on its 569 samples).
"""

from __future__ import annotations

import math

import numpy as np

from he_service.engine.batch.plan import INPUT, BatchPlan, BatchPoly
from he_service.engine.noise import FRESH, ROUNDING, NoiseEstimate

__all__ = ["estimate_batch_noise"]


def estimate_batch_noise(plan: BatchPlan, samples: int = 256, seed: int = 0) -> NoiseEstimate:
    """Return the simulated output error of the batch plan on unit-normal inputs.

    Args:
        plan: the compiled batch plan.
        samples: how many unit-normal samples to simulate.
        seed: seeds the samples and the injected noise.

    Returns:
        The spread and the largest absolute value of the output errors.
    """
    rng = np.random.default_rng(seed)
    n = plan.params.poly_modulus_degree
    scale = plan.params.scale
    features = rng.normal(size=(plan.input_length, samples))
    exact = plan.simulate(features)
    fresh = FRESH * math.sqrt(n) / scale
    values = {INPUT: features + rng.normal(0.0, fresh, features.shape)}
    for index, layer in enumerate(plan.layers):
        if isinstance(layer, BatchPoly):
            values[index] = layer.simulate(values[layer.source])
            continue
        out = layer.simulate(values, samples)
        rounding = ROUNDING * n * max(1, layer.rescales) / scale
        values[index] = out + rng.normal(0.0, rounding, out.shape)
    errors = np.abs(values[len(plan.layers) - 1] - exact)
    return NoiseEstimate(float(np.sqrt(np.mean(errors**2))), float(errors.max()))
