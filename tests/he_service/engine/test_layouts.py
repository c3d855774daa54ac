"""Every way to evaluate an affine map, simulated on slots holding garbage where allowed."""

import numpy as np
import pytest

from he_service.engine.layouts import Layout, affine_options, input_step

SLOTS = 256


def _laid_out(x: np.ndarray, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """Put x where the layout says; a strided layout gets garbage in every other slot."""
    slots = rng.normal(size=SLOTS) * 10 if not layout.clean else np.zeros(SLOTS)
    for k in range(SLOTS // layout.period if layout.clean else 1):
        slots[layout.position + k * layout.period] = x
    return slots


@pytest.mark.parametrize("seed", range(12))
def test_every_option_computes_the_map_in_its_output_layout(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 33))
    period = 1 << (n - 1).bit_length()
    stride = SLOTS // period
    m = int(rng.integers(1, min(16, stride) + 1))  # a gather needs m <= stride
    matrix, bias = rng.normal(size=(m, n)), rng.normal(size=m)
    x = rng.normal(size=n)
    replicated = Layout(period, rng.permutation(period)[:n], clean=True)
    strided = Layout(SLOTS, np.arange(n) * stride, clean=False)
    kinds = set()
    for inp in (replicated, strided):
        for last in (False, True):
            for step, out in affine_options(matrix, bias, inp, SLOTS, last=last):
                kinds.add(step.description.split()[0])
                y = step.simulate(_laid_out(x, inp, rng))
                np.testing.assert_allclose(y[out.position], matrix @ x + bias, atol=1e-9)
                if out.clean:  # replicas of the outputs and zeros, nothing else
                    expected = _laid_out(matrix @ x + bias, out, rng)
                    np.testing.assert_allclose(y, expected, atol=1e-9)
                if last:
                    assert out.clean, step.description
    assert {"hybrid", "gather"} <= kinds


def test_input_step_gathers_client_values_and_folds_whole_blocks() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(5, 40)) * (rng.random(size=(5, 40)) < 0.5)
    bias = rng.normal(size=5)
    first = input_step(matrix, bias, SLOTS)
    x = rng.normal(size=40)
    padded = np.concatenate([x, [0.0]])
    inputs = [np.tile(padded[row], SLOTS // first.index.shape[1]) for row in first.index]
    y = first.step.simulate(inputs)
    expected = _laid_out(matrix @ x + bias, first.layout, rng)
    np.testing.assert_allclose(y, expected, atol=1e-9)
    # 8 slots per block, so 32 blocks per ciphertext hold each output's <= 40 terms: 2 ciphertexts
    assert first.index.shape[0] * first.index.shape[1] // 8 >= int((matrix != 0).sum(1).max())
