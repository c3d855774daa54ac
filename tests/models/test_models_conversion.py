"""The converter: exact folding, fitted activations, depth, export, encrypted agreement."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from he_service.artifacts import load_artifact
from he_service.engine import compile_plan, forward_plain
from he_service.engine.selfcheck import encrypted_outputs
from models import (
    ConvertedNetwork,
    ExportError,
    FineTuneConfig,
    OutputRangeError,
    PolyActivation,
    Square,
    convert,
    depth_of,
    export_converted,
    fine_tune,
    fit_polynomial,
    out_of_range_fractions,
    validate,
)
from models._lowering import PoolConv2d
from models.polynomial import levels_of_degree

ACTIVATIONS: list[Callable[[], nn.Module]] = [
    nn.ReLU,
    lambda: nn.LeakyReLU(0.1),
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Mish,
    nn.PReLU,
]


def _batch_norm(cls: type[nn.Module], size: int, rng: np.random.Generator) -> nn.Module:
    """A BatchNorm in eval mode with random running statistics and affine parameters."""
    bn = cls(size)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(rng.normal(0, 0.5, size)))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, size)))
        bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, size)))
        bn.bias.copy_(torch.tensor(rng.normal(0, 0.3, size)))
    return bn.eval()


def _shape_after(layers: list[nn.Module], shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(nn.Sequential(*layers).eval()(torch.zeros(2, *shape)).shape[1:])


def random_network(
    seed: int, activation: Callable[[int], nn.Module]
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Build a random chain of supported layers with two activations (depth <= 5)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if seed % 3 != 2:  # an image network
        channels, size = int(rng.integers(1, 3)), int(rng.integers(6, 10))
        shape: tuple[int, ...] = (channels, size, size)
        bn_first = rng.random() < 0.3
        if bn_first:
            layers.append(_batch_norm(nn.BatchNorm2d, channels, rng))
        out = int(rng.integers(1, 3)) * 2
        kernel = int(rng.choice([1, 2, 3]))
        groups = 2 if channels == 2 and rng.random() < 0.5 else 1
        dilation = 2 if kernel == 2 and rng.random() < 0.5 else 1
        padding = 0 if bn_first else int(rng.integers(0, 2))
        stride = int(rng.choice([1, 2]))
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups))
        if rng.random() < 0.6:
            layers.append(_batch_norm(nn.BatchNorm2d, out, rng))
        layers.append(activation(0))
        layers.append(nn.Dropout2d(0.2) if rng.random() < 0.5 else nn.Identity())
        spatial = _shape_after(layers, shape)[1]
        pool = rng.integers(0, 3)
        if pool == 0 and spatial >= 2:
            layers.append(nn.AvgPool2d(2))
        elif pool == 1 and spatial >= 3:
            layers.append(nn.AvgPool2d(3, stride=1, padding=1))
        elif spatial % 2 == 0:
            layers.append(nn.AdaptiveAvgPool2d(spatial // 2))
        layers.append(nn.Flatten())
        features = int(np.prod(_shape_after(layers, shape)))
    else:  # a vector network
        shape = (int(rng.integers(3, 12)),)
        if rng.random() < 0.5:
            layers.append(_batch_norm(nn.BatchNorm1d, shape[0], rng))
        features = int(rng.integers(3, 9))
        layers.append(nn.Linear(shape[0], features))
        if rng.random() < 0.5:
            layers.append(_batch_norm(nn.BatchNorm1d, features, rng))
        layers.append(activation(0))
    hidden = int(rng.integers(3, 9))
    layers.append(nn.Linear(features, hidden, bias=bool(rng.random() < 0.8)))
    if rng.random() < 0.7:
        layers.append(_batch_norm(nn.BatchNorm1d, hidden, rng))
    layers.append(activation(1))
    layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(hidden, int(rng.integers(2, 5))))
    return nn.Sequential(*layers).eval(), shape


def _calibration(shape: tuple[int, ...], seed: int, n: int = 64) -> np.ndarray:
    return np.random.default_rng(seed + 1000).normal(size=(n, *shape))


def _torch_outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.to(torch.float64)(torch.tensor(x, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("seed", range(12))
def test_folding_and_pooling_are_exact(seed: int) -> None:
    # With x*x activations nothing is fitted: the converted network must equal the original.
    model, shape = random_network(seed, lambda _: Square())
    x = _calibration(shape, seed)
    network, report = convert(model, x)
    assert report.activations == ()
    assert all(isinstance(m, nn.Conv2d | nn.Linear | nn.Flatten | PolyActivation) for m in network)
    expected = _torch_outputs(model, x)
    np.testing.assert_allclose(_torch_outputs(network, x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_random_networks_convert_export_and_run_encrypted(seed: int, tmp_path: Path) -> None:
    def activation(slot: int) -> nn.Module:
        return ACTIVATIONS[(2 * seed + slot) % len(ACTIVATIONS)]()

    model, shape = random_network(seed, activation)
    x = _calibration(shape, seed)
    assert validate(model, shape) == []
    network, report = convert(model, x, degrees=2)
    assert len(report.activations) == 2
    assert network.depth == report.depth <= 5

    outputs = _torch_outputs(network, x)
    labels = [f"class-{i}" for i in range(outputs.shape[1])]
    export_converted(
        network, tmp_path, "random-net", labels=labels, preprocessing={}, check_x=x, report=report
    )
    artifact = load_artifact(tmp_path / "random-net")
    plain = np.stack([forward_plain(artifact, sample) for sample in x[:4]])
    np.testing.assert_allclose(plain, outputs[:4], rtol=1e-9, atol=1e-9)

    plan = compile_plan(artifact)
    assert plan.params_reason["depth"] == network.depth
    encrypted = encrypted_outputs(plan, [x[0]], seed=0)[0]
    scale = max(1.0, float(np.abs(plain[0]).max()))
    np.testing.assert_allclose(encrypted, plain[0], atol=1e-2 * scale)


def test_every_supported_activation_is_covered_by_the_random_networks() -> None:
    used = {(2 * seed + slot) % len(ACTIVATIONS) for seed in range(8) for slot in (0, 1)}
    assert used == set(range(len(ACTIVATIONS)))


def test_avgpool_as_convolution_matches_torch() -> None:
    x = torch.tensor(np.random.default_rng(0).normal(size=(3, 2, 7, 7)))
    for pool in (
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AvgPool2d((2, 3), stride=(1, 2)),
        nn.AvgPool2d(2, divisor_override=3),
    ):
        model = nn.Sequential(nn.Conv2d(2, 2, 1), pool, nn.Flatten()).double().eval()
        network, _ = convert(model, x.numpy())
        assert isinstance(network[1], PoolConv2d)
        assert not any(p.requires_grad for p in network[1].parameters())
        np.testing.assert_allclose(
            _torch_outputs(network, x.numpy()), _torch_outputs(model, x.numpy()), rtol=1e-12
        )


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten()],
        [nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.Flatten()],
        [nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(50, 3)],
        [nn.Conv2d(2, 3, 3), nn.Flatten(), nn.BatchNorm1d(27), nn.Linear(27, 3)],
        [nn.Flatten(), nn.Linear(50, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)],
        [nn.Flatten(), nn.BatchNorm1d(50), nn.BatchNorm1d(50), nn.Linear(50, 4)],
        [nn.Conv2d(2, 4, 3, groups=2, dilation=2, bias=False), nn.BatchNorm2d(4), nn.Flatten()],
        [nn.Conv2d(2, 2, 3, padding="same"), nn.AdaptiveAvgPool2d(1), nn.Flatten()],
    ],
)
def test_batch_norm_folding_matches_torch(layers: list[nn.Module]) -> None:
    rng = np.random.default_rng(1)
    layers = [
        _batch_norm(type(m), m.num_features, rng) if isinstance(m, nn.modules.batchnorm._BatchNorm)
        else m
        for m in layers
    ]  # fmt: skip
    model = nn.Sequential(*layers).double().eval()
    x = rng.normal(size=(5, 2, 5, 5))
    network, report = convert(model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network)
    folded = [c for c in report.changes if "BatchNorm" in c.old]
    assert all("folded into" in c.new or "combined with" in c.new for c in folded)
    np.testing.assert_allclose(_torch_outputs(network, x), _torch_outputs(model, x), rtol=1e-10)


def test_convert_works_on_a_copy_and_logs_one_line_per_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 2)
    ).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(50, 4))
    with caplog.at_level(logging.INFO, logger="models.conversion"):
        network, report = convert(model, x, degrees=2)
    assert model.training and all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == report.lines()
    assert messages[0].startswith("0: Linear(")
    assert messages[1] == "1: " + report.changes[1].old + " -> folded into 0"
    assert messages[2].startswith("2: ReLU() -> poly degree 2 on [")
    assert "fit rms error" in messages[2]
    assert messages[3].endswith("-> removed (identity at inference)")
    assert messages[-1].startswith("multiplicative depth 1 ")
    (fit,) = report.activations
    lo, hi = fit.lo, fit.hi
    assert isinstance(network[1], PolyActivation) and (network[1].lo, network[1].hi) == (lo, hi)
    assert report.to_json()["activations"][0]["range"] == [lo, hi]
    assert isinstance(network[1:], ConvertedNetwork) and network[1:].paths == network.paths[1:]


def _identity_then(activation: nn.Module) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 3), activation, nn.Linear(3, 2))
    with torch.no_grad():  # the activation sees the standard normal calibration values
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    return model


def test_degree_choice() -> None:
    x = np.random.default_rng(0).normal(size=(400, 3))
    # Relative errors here: sigmoid 0.137 / 0.031 at degree 2 / 3, ReLU 0.20 / 0.19 / 0.116.
    _, sigmoid = convert(_identity_then(nn.Sigmoid()), x, tolerance=0.12)
    _, relu = convert(_identity_then(nn.ReLU()), x, tolerance=0.12)
    assert [a.degree for a in sigmoid.activations + relu.activations] == [3, 4]
    assert all(a.within_tolerance and a.levels == 2 for a in sigmoid.activations)
    assert relu.depth == 2  # a quartic costs two levels
    _, capped = convert(_identity_then(nn.ReLU()), x, max_degree=2)
    assert [a.degree for a in capped.activations] == [2]
    assert not capped.activations[0].within_tolerance
    assert "above tolerance" in capped.lines()[1]
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 2))
    _, fixed = convert(model, x, degrees=(2, 4))
    assert [a.degree for a in fixed.activations] == [2, 4]
    with pytest.raises(ValueError, match="1, 3"):
        convert(model, x, degrees=(2,))
    with pytest.raises(ValueError, match="degree"):
        convert(model, x, degrees=9)


def test_depth_counts_like_the_engine(tmp_path: Path) -> None:
    assert [levels_of_degree(d) for d in range(1, 9)] == [0, 1, 2, 2, 3, 3, 3, 3]
    linear = nn.Linear(2, 2)
    poly2 = PolyActivation((0.0, 1.0, 1.0), -1, 1)
    affine = PolyActivation((1.0, 2.0), -1, 1)
    # Lazy rescaling: affine maps ride on the activations' primes.
    assert depth_of([linear, poly2, linear]) == 1
    assert depth_of([linear, nn.Flatten(), linear, poly2, linear]) == 1
    assert depth_of([linear, affine, linear]) == 0  # merges into one affine map
    assert depth_of([linear, poly2]) == 1

    # Degree 3-4 polynomials: the engine is the authority where it supports them.
    x = np.random.default_rng(0).normal(size=(64, 3))
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    network, _ = convert(model, x, degrees=4)
    assert network.depth == 2
    export_converted(network, tmp_path, "quartic", labels=["a", "b"], preprocessing={}, check_x=x)
    plan = compile_plan(load_artifact(tmp_path / "quartic"))
    assert plan.params_reason["depth"] == network.depth


def test_too_deep_for_any_ring_is_refused_and_nothing_written(tmp_path: Path) -> None:
    layers: list[nn.Module] = []
    for _ in range(21):
        layers += [nn.Linear(2, 2), Square()]
    layers.append(nn.Linear(2, 2))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.eye(2) * 0.5)
                layer.bias.zero_()
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(8, 2))
    network, report = convert(model, x)
    assert network.depth == report.depth == 21
    assert report.lines()[-1].startswith("multiplicative depth 21 ")
    with pytest.raises(ExportError) as caught:
        export_converted(network, tmp_path, "deep", labels=["a", "b"], preprocessing={}, check_x=x)
    message = str(caught.value)
    assert "21 activations" in message and "holds at most" in message
    assert list(tmp_path.iterdir()) == []


def test_outputs_beyond_the_headroom_are_refused_and_nothing_written(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e4)
    x = np.random.default_rng(0).normal(size=(32, 2))
    network, _ = convert(model, x, degrees=2)
    with pytest.raises(OutputRangeError, match="below 2048"):
        export_converted(network, tmp_path, "loud", labels=["a", "b"], preprocessing={}, check_x=x)
    assert list(tmp_path.iterdir()) == []


def test_bad_calibration_data_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="samples"):
        convert(model, np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        convert(model, np.array([[np.nan, 0.0]]))


def test_polynomial_fit() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    exact = fit_polynomial(lambda v: 3 * v * v - v + 0.5, x, 2)
    np.testing.assert_allclose(exact.coeffs, [0.5, -1.0, 3.0], atol=1e-9)
    assert exact.rms_error < 1e-9 and exact.lo == x.min() and exact.hi == x.max()
    relu = [fit_polynomial(lambda v: np.maximum(v, 0), x, d).relative_error for d in (2, 4, 6)]
    assert relu[0] > relu[1] > relu[2]
    constant = fit_polynomial(np.tanh, np.full(10, 0.3), 2)  # a unit that never varies
    assert constant.lo < 0.3 < constant.hi
    poly = PolyActivation(exact.coeffs, exact.lo, exact.hi)
    values = torch.linspace(-2, 2, 9, dtype=torch.float64)
    np.testing.assert_allclose(
        poly(values).numpy(), np.polynomial.polynomial.polyval(values.numpy(), exact.coeffs)
    )
    assert float(poly.range_excess(torch.tensor([exact.lo, exact.hi]))) == 0.0
    assert float(poly.range_excess(torch.tensor([exact.hi + 10.0]))) > 0.0


def test_fine_tune_is_deterministic_and_keeps_the_original() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1, 6, 6))
    y = (x.reshape(200, -1).mean(axis=1) > 0).astype(np.int64)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    )
    network, _ = convert(model, x, degrees=2)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    config = FineTuneConfig(epochs=2, batch_size=32, range_weight=10.0)
    first = fine_tune(network, x, y, config)
    second = fine_tune(network, x, y, config)
    assert isinstance(first, ConvertedNetwork) and first.paths == network.paths
    assert all(torch.equal(before[k], network.state_dict()[k]) for k in before)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not torch.equal(first[0].weight, network[0].weight)
    assert torch.equal(first[2].weight, network[2].weight)  # the pooling stays a pooling
    assert first[0].weight.dtype == torch.float64
    (fraction,) = out_of_range_fractions(first, x)
    assert 0.0 <= fraction < 0.05
