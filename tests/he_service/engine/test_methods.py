"""Every way to evaluate a term computes the operator's matrix, on random shapes."""

from __future__ import annotations

import numpy as np
import pytest

from he_service.engine.layout import Grid, Layout, next_pow2
from he_service.engine.methods import (
    conv_product,
    dense_product,
    free_op,
    gather_input,
    scale_product,
    window_product,
)
from he_service.engine.ops import Conv, Diagonal, Pool
from he_service.engine.schedule import Rotation

SLOTS = 1024


def _cost(rotations: list[Rotation], products: int) -> float:
    return len(rotations) + 0.05 * products


def _clean_elsewhere(slots: np.ndarray, layout: Layout) -> bool:
    mask = np.ones(slots.size, dtype=bool)
    period = layout.period
    for k in range(slots.size // period):
        mask[layout.positions + k * period] = False
    return bool(np.all(np.abs(slots[mask]) < 1e-9))


def _image_layout(shape: tuple[int, int, int], rng: np.random.Generator) -> Layout:
    c, h, w = shape
    stride = int(rng.integers(1, 3))
    ys, xs = w * stride * stride, stride
    block = next_pow2((h - 1) * ys + (w - 1) * xs + 1)
    if c == 1 and rng.random() < 0.5:  # one block, repeated: every block holds the image
        grid = Grid(ys, xs, (), ((),), int(rng.integers(0, 3)))
        return Layout.of_grid(shape, grid, block, clean=True)
    grid = Grid(ys, xs, (block,), tuple((i,) for i in range(c)), int(rng.integers(0, 5)))
    return Layout.of_grid(shape, grid, SLOTS, clean=False)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("babies", [True, False])
def test_convolutions_on_grids(seed: int, babies: bool) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    h, w = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    k = int(rng.integers(1, min(4, h + 2 * pad, w + 2 * pad) + 1))  # fits the padded input
    inp = _image_layout((c_in, h, w), rng)
    weight = rng.normal(size=(c_out, c_in, k, k))
    weight[rng.random(size=weight.shape) < 0.2] = 0.0
    conv = Conv(weight, (stride, stride), (pad, pad), (c_in, h, w))
    assert inp.grid is not None
    out_grid = inp.grid.strided(stride, stride)
    block = next_pow2(max(inp.grid.extent((c_in, h, w)), out_grid.extent(conv.out_shape)))
    blocks = SLOTS // block
    if c_out <= blocks:
        gens, coords = (block,), tuple((o,) for o in range(c_out))
    else:  # multiplex channels into the gaps of a strided output
        if inp.grid.xs * stride < 2:
            pytest.skip("no gaps to multiplex into")
        gens, coords = (block, 1), tuple((o % blocks, o // blocks) for o in range(c_out))
    built = conv_product(conv, inp, None, gens, coords, SLOTS, _cost, allow_babies=babies)
    if (conv.out_shape[2] - 1) * out_grid.xs >= out_grid.ys:  # a padded row overruns the next
        assert built is None
        return
    assert built is not None
    product, out = built
    x = rng.normal(size=c_in * h * w)
    slots = product.simulate(inp.encode(x, SLOTS))
    np.testing.assert_allclose(out.decode(slots), conv.matrix() @ x, atol=1e-9)
    assert _clean_elsewhere(slots, out)
    if not babies:
        assert all(r.on_product for r in product.rotations())


@pytest.mark.parametrize("seed", range(20))
def test_convolution_into_a_given_grid_pays_one_rotation_for_the_offset(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (2, 5, 5)
    grid = Grid(5, 1, (64,), ((0,), (1,)), 3)
    inp = Layout.of_grid(shape, grid, SLOTS, clean=True)
    conv = Conv(rng.normal(size=(2, 2, 3, 3)), (1, 1), (1, 1), shape)
    built = conv_product(conv, inp, grid, (), (), SLOTS, _cost, allow_babies=True)
    assert built is not None
    product, out = built
    np.testing.assert_array_equal(out.positions, inp.positions)  # a residual block's layout
    x = rng.normal(size=50)
    np.testing.assert_allclose(
        out.decode(product.simulate(inp.encode(x, SLOTS))), conv.matrix() @ x, atol=1e-9
    )


@pytest.mark.parametrize("seed", range(30))
def test_dense_maps_between_any_layouts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(2, 60)), int(rng.integers(1, 40))
    if rng.random() < 0.5:
        p_in = next_pow2(n) * int(rng.choice([1, 2, 4]))
        inp = Layout(
            (n,), rng.permutation(p_in)[:n].astype(np.int64), p_in, bool(rng.random() < 0.5)
        )
    else:
        inp = Layout((n,), rng.permutation(SLOTS)[:n].astype(np.int64), SLOTS, False)
    p_out = next_pow2(m) * int(rng.choice([1, 2, 4, 8]))
    out = Layout.contiguous(m, min(p_out, SLOTS))
    matrix = rng.normal(size=(m, n)) * (rng.random(size=(m, n)) < 0.7)
    product = dense_product(matrix, inp, out, SLOTS, _cost, allow_babies=bool(seed % 2))
    if product is None:
        assert out.period % inp.period and inp.period % out.period
        return
    x = rng.normal(size=n)
    slots = product.simulate(inp.encode(x, SLOTS))
    for k in range(SLOTS // out.period):
        np.testing.assert_allclose(slots[out.positions + k * out.period], matrix @ x, atol=1e-9)
    assert _clean_elsewhere(slots, out)


@pytest.mark.parametrize("seed", range(15))
def test_windows_leave_outputs_strided(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(4, 64)), int(rng.integers(2, 16))
    inp = Layout.contiguous(n, next_pow2(n))
    width = 1 << int(rng.integers(1, int(np.log2(inp.period)) + 1))
    matrix = rng.normal(size=(m, n))
    built = window_product(matrix, inp, width, SLOTS, _cost, allow_babies=True)
    if built is None:
        assert width * m > SLOTS
        return
    product, out = built
    x = rng.normal(size=n)
    np.testing.assert_allclose(
        out.decode(product.simulate(inp.encode(x, SLOTS))), matrix @ x, atol=1e-9
    )


def test_pooling_windows_and_scales() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 6, 6)
    grid = Grid(6, 1, (64,), ((0,), (1,), (2,)), 0)
    inp = Layout.of_grid(shape, grid, SLOTS, clean=True)
    pool = Pool((2, 2), (2, 2), shape)
    applied = free_op(pool, inp, SLOTS, on_product=False)
    assert applied is not None
    window, out = applied
    assert window is not None and out.grid is not None and (out.grid.ys, out.grid.xs) == (12, 2)
    x = rng.normal(size=108)
    np.testing.assert_allclose(out.decode(window.simulate(inp.encode(x, SLOTS))), pool.matrix() @ x)
    scale = Diagonal(rng.normal(size=27), out.shape)
    product = scale_product(scale, out, SLOTS)
    y = rng.normal(size=27)
    np.testing.assert_allclose(out.decode(product.simulate(out.encode(y, SLOTS))), scale.factor * y)
    assert product.rotations() == []


def test_gathered_inputs() -> None:
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(5, 30)) * (rng.random(size=(5, 30)) < 0.5)
    step, out = gather_input(matrix, SLOTS)
    x = rng.normal(size=30)
    padded = np.concatenate([x, [0.0]])
    inputs = [np.tile(padded[row], SLOTS // step.index.shape[1]) for row in step.index]
    np.testing.assert_allclose(out.decode(step.simulate(inputs)), matrix @ x, atol=1e-9)
