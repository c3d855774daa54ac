"""Convolution-aware layouts on random shapes, checked against torch itself.

Random CNNs (channels, kernel sizes, strides, padding, average pooling, BatchNorm-scaled
pools) are compiled; their plans are simulated slot by slot and compared with torch's
``conv2d``/``avg_pool2d`` forward of the same weights. Key budgets change keys and rotations,
never results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from he_service.artifacts import Conv2d, Flatten, Layer, Linear, Poly
from he_service.engine import compile_plan
from he_service.engine.params import REGIMES
from he_service.protocol import decode_output, encode_input

from .networks import make_artifact


def _random_cnn(rng: np.random.Generator) -> tuple[list[Layer], list[object], tuple[int, int, int]]:
    """Return artifact layers, the same network as torch calls, and the input shape."""
    channels, size = int(rng.integers(1, 4)), int(rng.integers(6, 13))
    shape = (channels, size, size)
    layers: list[Layer] = []
    calls: list[object] = []
    for _ in range(int(rng.integers(1, 3))):
        out_ch, k = int(rng.integers(1, 6)), int(rng.choice([1, 3, 5]))
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1))
        if (size + 2 * pad - k) // stride + 1 < 2:
            break
        weight = rng.normal(size=(out_ch, channels, k, k)) / (k * np.sqrt(channels))
        bias = rng.normal(size=out_ch) * 0.1
        layers.append(Conv2d(weight, bias, (stride, stride), (pad, pad)))
        calls.append(("conv", weight, bias, stride, pad))
        coeffs = (0.05, 0.5, 0.2)
        layers.append(Poly(coeffs))
        calls.append(("poly", coeffs))
        size = (size + 2 * pad - k) // stride + 1
        channels = out_ch
        if size >= 4 and rng.random() < 0.6:
            factor = rng.uniform(0.5, 1.5, size=channels)  # BatchNorm folded into the pool
            pool = np.zeros((channels, channels, 2, 2))
            for c in range(channels):
                pool[c, c] = 0.25 * factor[c]
            layers.append(Conv2d(pool, np.zeros(channels), (2, 2), (0, 0)))
            calls.append(("pool", factor))
            size //= 2
    layers.append(Flatten())
    width = channels * size * size
    outputs = int(rng.integers(2, 6))
    weight = rng.normal(size=(outputs, width)) / np.sqrt(width)
    layers.append(Linear(weight, np.zeros(outputs)))
    calls.append(("linear", weight))
    return layers, calls, shape


def _torch_forward(calls: list[object], x: np.ndarray) -> np.ndarray:
    value = torch.from_numpy(x[None])
    for call in calls:
        kind = call[0]  # type: ignore[index]
        if kind == "conv":
            _, weight, bias, stride, pad = call  # type: ignore[misc]
            value = F.conv2d(value, torch.from_numpy(weight), torch.from_numpy(bias), stride, pad)
        elif kind == "poly":
            c0, c1, c2 = call[1]  # type: ignore[index]
            value = c0 + c1 * value + c2 * value * value
        elif kind == "pool":
            factor = torch.from_numpy(call[1])  # type: ignore[index]
            value = F.avg_pool2d(value, 2) * factor[None, :, None, None]
        else:
            value = value.reshape(1, -1) @ torch.from_numpy(call[1]).T  # type: ignore[index]
    return value.numpy().reshape(-1)


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: r.name)
@pytest.mark.parametrize("seed", range(16))
def test_random_cnns_match_torch(regime, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    layers, calls, shape = _random_cnn(rng)
    artifact = make_artifact(layers, shape)
    plan = compile_plan(artifact, regimes=(regime,))
    x = rng.normal(size=shape)
    got = decode_output(plan.simulate(encode_input(x, plan.input_encoding)), plan.output_decoding)
    np.testing.assert_allclose(got, _torch_forward(calls, x), atol=1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_a_key_budget_trades_keys_for_rotations_not_results(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    layers, calls, shape = _random_cnn(rng)
    artifact = make_artifact(layers, shape)
    free = compile_plan(artifact, key_budget_bytes=1 << 40)
    key = free.params.key_switch_key_bytes()
    assert len(free.galois_steps) >= 4, "the random network must have keys to budget"
    tight = compile_plan(artifact, key_budget_bytes=(len(free.galois_steps) // 2 + 1) * key)
    assert len(tight.galois_steps) < len(free.galois_steps)
    assert tight.costs()["public_key_bytes"] < free.costs()["public_key_bytes"]
    assert tight.rotation_count() >= free.rotation_count()
    x = rng.normal(size=shape)
    for plan in (free, tight):
        slots = plan.simulate(encode_input(x, plan.input_encoding))
        got = decode_output(slots, plan.output_decoding)
        np.testing.assert_allclose(got, _torch_forward(calls, x), atol=1e-8)
