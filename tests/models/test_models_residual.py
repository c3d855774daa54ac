"""Residual networks: tracing, exact lowering, fitting in branches, manifests, refusals."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from he_service.artifacts import load_artifact
from he_service.engine import forward_plain
from models import (
    ConversionError,
    ConvertedNetwork,
    FineTuneConfig,
    PolyActivation,
    Residual,
    Square,
    artifact_forward,
    convert,
    converted_manifest,
    depth_of,
    fine_tune,
    out_of_range_fractions,
    validate,
)
from models.export import manifest_bytes, npz_bytes


def _stage(root: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write an artifact's files as the exporter does, without the engine's compile."""
    directory = root / manifest["name"]
    directory.mkdir(parents=True)
    weights = npz_bytes(arrays)
    (directory / "weights.npz").write_bytes(weights)
    full = {
        **manifest,
        "weights": {"file": "weights.npz", "sha256": hashlib.sha256(weights).hexdigest()},
    }
    (directory / "manifest.json").write_bytes(manifest_bytes(full))
    return directory


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters; eval mode."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            size = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.tensor(rng.normal(0, 0.3, size)))
                module.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, size)))
                module.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, size)))
                module.bias.copy_(torch.tensor(rng.normal(0, 0.2, size)))
    return model.eval()


def _outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        result: np.ndarray = model.double().eval()(torch.tensor(x, dtype=torch.float64)).numpy()
    return result


class ResidualMLP(nn.Module):
    """``head(act(bn(h + fc2(act(bn1(fc1(h)))))))`` with ``h = act(fc_in(x))``."""

    def __init__(self, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.fc_in = nn.Linear(6, 8)
        self.act0 = act()
        self.fc1 = nn.Linear(8, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.act1 = act()
        self.fc2 = nn.Linear(8, 8)
        self.bn_out = nn.BatchNorm1d(8)
        self.act2 = act()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act0(self.fc_in(x))
        h = self.bn_out(h + self.fc2(self.act1(self.bn1(self.fc1(h)))))
        return self.head(self.act2(h))


class Block(nn.Module):
    """A ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        out += x if self.shortcut is None else self.shortcut(x)
        return self.act2(out)


class Nested(nn.Module):
    """``x + bn(conv(block(x)))``: a residual block inside a residual branch."""

    def __init__(self, channels: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.inner = Block(channels, channels, 1, act)
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(self.inner(x)))


class ResidualCNN(nn.Module):
    """Stem, an identity block, a projection block, a nested block, pooling, a linear head."""

    def __init__(self, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act())
        self.layer = nn.Sequential(Block(4, 4, 1, act), Block(4, 8, 2, act), Nested(8, act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer(self.stem(x))), 1))


def _images(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, size=(n, 1, 8, 8))


def _vectors(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, size=(n, 6))


def _round_trip(
    network: ConvertedNetwork, tmp_path: Path, x: np.ndarray, labels: int, **extra: Any
) -> None:
    """The manifest, written and loaded by the server's loader, computes the network."""
    manifest, arrays = converted_manifest(
        network, "net", labels=[str(i) for i in range(labels)], preprocessing={}, **extra
    )
    assert manifest["format_version"] == 2
    artifact = load_artifact(_stage(tmp_path, manifest, arrays))
    expected = _outputs(network, x)
    batched, _ = artifact_forward(artifact, x)
    np.testing.assert_allclose(batched, expected, rtol=1e-10, atol=1e-12)
    for sample, row in zip(x[:4], expected[:4], strict=True):
        np.testing.assert_allclose(forward_plain(artifact, sample), row, rtol=1e-10, atol=1e-12)


def test_residual_mlp_lowers_exactly_and_round_trips(tmp_path: Path) -> None:
    model = _randomise(ResidualMLP(Square), 0)
    x = _vectors()
    assert validate(model, (6,)) == []
    network, report = convert(model, x)
    np.testing.assert_allclose(_outputs(network, x), _outputs(model, x), rtol=1e-10)
    kinds = [type(m).__name__ for m in network]
    assert kinds == ["Linear", "PolyActivation", "Residual", "PolyActivation", "Linear"]
    join = network[2]
    assert isinstance(join, Residual)
    identity, path = join.networks()
    # BatchNorm after the sum: its scale folds into fc2, and the identity branch becomes an
    # explicit per-feature scale that carries the shift.
    assert identity.paths == ("bn_out:branch1",) and path.paths[-1] == "fc2"
    assert isinstance(identity[0], nn.Linear)
    weight = identity[0].weight.detach()
    assert torch.equal(weight, torch.diag(torch.diagonal(weight)))
    assert not identity[0].weight.requires_grad
    folded = next(c for c in report.changes if c.path == "bn_out")
    assert (
        folded.new == "folded into the branches of add: new per-channel scale bn_out:branch1, fc2"
    )
    _round_trip(network, tmp_path, x, 3)


def test_residual_cnn_with_identity_projection_and_nested_blocks(tmp_path: Path) -> None:
    model = _randomise(ResidualCNN(Square), 1)
    x = _images()
    network, report = convert(model, x)
    np.testing.assert_allclose(_outputs(network, x), _outputs(model, x), rtol=1e-9)
    # stem 1 + block 2 + block 2 + nested (inner block 2): the longest path.
    assert network.depth == report.depth == depth_of(network) == 7
    block, projection, nested = (m for m in network if isinstance(m, Residual))
    assert [len(b) for b in block.networks()] == [3, 0]  # conv1, act1, conv2 | identity
    assert [b.paths for b in projection.networks()][1] == ("layer.1.shortcut.0",)
    inner = nested.networks()[1]
    assert isinstance(inner[0], Residual) and inner.paths[-1] == "layer.2.conv"
    paths = [path for _, path, _ in network.walk()]
    assert len(paths) == len(set(paths))
    _round_trip(network, tmp_path, x, 3)


def test_fits_see_the_converted_values_inside_branches(tmp_path: Path) -> None:
    model = _randomise(ResidualCNN(nn.ReLU), 2)
    x = _images()
    network, report = convert(model, x, degrees=2)
    seen: dict[int, tuple[float, float]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[id(module)] = (float(args[0].min()), float(args[0].max()))

    handles = [m.register_forward_pre_hook(record) for _, _, m in network.activations()]
    _outputs(network, x)
    for handle in handles:
        handle.remove()
    activations = network.activations()
    assert len(activations) == len(report.activations) == 7
    for (position, path, module), fit in zip(activations, report.activations, strict=True):
        assert fit.layer == position and fit.path == path
        assert (module.lo, module.hi) == pytest.approx(seen[id(module)], rel=1e-12)
    manifest, arrays = converted_manifest(
        network, "net", labels=["a", "b", "c"], preprocessing={}, report=report
    )
    entries = manifest["conversion"]["activations"]
    assert entries[0]["layer"] == 1 and entries[1]["layer"] == [2, 0, 1]
    artifact = load_artifact(_stage(tmp_path, manifest, arrays))
    _, captured = artifact_forward(artifact, x, capture=True)
    assert list(captured) == [position for position, _, _ in activations]
    for (position, _, module), entry in zip(activations, entries, strict=True):
        assert entry["range"] == [module.lo, module.hi]
        values = captured[position]
        assert (values.min(), values.max()) == pytest.approx((module.lo, module.hi), rel=1e-12)
    assert out_of_range_fractions(network, x) == [0.0] * 7


def test_report_shows_the_nesting() -> None:
    model = _randomise(ResidualCNN(nn.ReLU), 3)
    _, report = convert(model, _images(), degrees=2)
    lines = report.lines()
    start = lines.index("layer.0.add: operator.add() in forward -> add of 2 branches")
    assert lines[start + 1] == "  branch 1:"
    assert lines[start + 2].startswith("    layer.0.conv1: Conv2d(4, 4")
    assert lines[start + 7] == "  branch 2: identity"
    assert any(line.startswith("        layer.2.inner.conv1: ") for line in lines)
    changes = report.to_json()["changes"]
    join = next(c for c in changes if c["path"] == "layer.0.add")
    assert [len(b) for b in join["branches"]] == [5, 0]
    assert join["branches"][0][2]["to"].startswith("poly degree 2 on [")
    json.dumps(report.to_json())


class Difference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.act1 = Square()
        self.fc2 = nn.Linear(6, 6)
        self.act2 = Square()
        self.fc3 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        y = self.fc2(self.act1(h)) - h
        z = y - self.fc3(self.act2(y))
        return self.head(z)


def test_difference_of_branches_is_a_sum_with_a_negated_branch(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = Difference().eval()
    x = _vectors()
    network, report = convert(model, x)
    np.testing.assert_allclose(_outputs(network, x), _outputs(model, x), rtol=1e-10)
    first, second = (c for c in report.changes if c.branches)
    assert first.new == "add of 2 branches, branch 2 negated in new per-channel scale sub:minus"
    assert second.new == "add of 2 branches, branch 2 negated in fc3"
    _round_trip(network, tmp_path, x, 2)


def test_a_value_shared_outside_its_block_is_refused() -> None:
    class Bridge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.g = nn.Linear(4, 4)
            self.h = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.f(x)
            b = self.g(x) + a
            return self.head(self.h(a) + b)

    (problem,) = validate(Bridge(), (4,))
    assert problem.path == "f"
    assert "only the input of a block may be shared" in problem.reason
    assert "nested blocks" in problem.fix


class BatchNormAfterSums(nn.Module):
    """``head(act(bn((h + f(h)) + g(h))))``: a BatchNorm after nested sums of feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.f = nn.Conv2d(3, 3, 3, padding=1)
        self.g = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.act = Square()
        self.head = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        total = (h + self.f(h)) + self.g(h)
        return self.head(self.act(self.bn(total)).flatten(1))


def test_batch_norm_after_nested_sums_folds_into_every_branch(tmp_path: Path) -> None:
    model = _randomise(BatchNormAfterSums(), 5)
    x = _images()
    network, report = convert(model, x)
    np.testing.assert_allclose(_outputs(network, x), _outputs(model, x), rtol=1e-10)
    folded = next(c for c in report.changes if c.path == "bn")
    assert folded.new == (
        "folded into the branches of add_1: new per-channel scale bn:branch1.1, f, g"
    )
    outer = network[1]
    assert isinstance(outer, Residual)
    inner = outer.networks()[0][0]
    assert isinstance(inner, Residual)
    scale = inner.networks()[0][0]
    assert isinstance(scale, nn.Conv2d) and scale.kernel_size == (1, 1)
    weight = scale.weight.detach()[:, :, 0, 0]
    assert torch.equal(weight, torch.diag(torch.diagonal(weight)))
    _round_trip(network, tmp_path, x, 2)


def test_one_module_in_two_branches_gets_two_weight_names(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(x) + self.fc(x))

    network, _ = convert(Twice().double().eval(), _vectors())
    manifest, arrays = converted_manifest(network, "net", labels=["a", "b"], preprocessing={})
    assert sorted(arrays) == sorted(
        ["fc.weight", "fc.bias", "fc:2.weight", "fc:2.bias", "head.weight", "head.bias"]
    )
    assert manifest["layers"][0]["branches"][1][0]["weight"] == "fc:2.weight"
    _round_trip(network, tmp_path, _vectors(), 2)


def test_fine_tuning_trains_through_residual_blocks() -> None:
    model = _randomise(ResidualMLP(nn.ReLU), 6)
    x = _vectors(200)
    y = (x.sum(axis=1) > 0).astype(np.int64) + (x[:, 0] > 0.5)
    network, _ = convert(model, x, degrees=2)
    config = FineTuneConfig(epochs=2, batch_size=32)
    tuned = fine_tune(network, x, y, config)
    again = fine_tune(network, x, y, config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    before, after = network[2].networks(), tuned[2].networks()
    assert not torch.equal(before[1][0].weight, after[1][0].weight)  # fc1 in the branch
    # The skip scale is frozen (fine-tuning runs in float32, hence the rounding).
    assert torch.equal(before[0][0].weight.float().double(), after[0][0].weight)
    assert isinstance(tuned[2], Residual) and tuned.paths == network.paths


class Join(nn.Module):
    """Two branches from one input, combined by ``combine``."""

    def __init__(self, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.g = nn.Linear(4, 4)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.f(x), self.g(x))


@pytest.mark.parametrize(
    ("combine", "path", "reason", "fix"),
    [
        (lambda a, b: torch.cat([a, b], 1), "cat", "concatenation of branches", "sum of one"),
        (lambda a, b: a * b, "mul", "multiplies (or divides) two tensors", "by a sum"),
        (lambda a, b: a @ b.T, "matmul", "attention score", "by a sum"),
        (
            lambda a, b: F.scaled_dot_product_attention(a[None], b[None], b[None])[0],
            "scaled_dot_product_attention",
            "attention needs softmax",
            "residual sums",
        ),
        (lambda a, b: torch.add(a, b, alpha=0.5), "add", "alpha scales one branch", "without"),
    ],
)
def test_joins_other_than_sums_are_refused_by_name(
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: str, reason: str, fix: str
) -> None:
    problems = validate(Join(combine), (4,))
    problem = next(p for p in problems if p.path == path)
    assert reason in problem.reason and fix in problem.fix


def test_problems_inside_branches_are_reported_too() -> None:
    class Inside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.pool = nn.MaxPool1d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.pool(self.fc(x)[:, None])[:, 0] - 1], 1)

    paths = {p.path for p in validate(Inside(), (4,))}
    assert {"cat", "pool", "sub"} <= paths


def test_mismatched_branches_name_both_branches_and_shapes() -> None:
    model = ResidualCNN(nn.ReLU)
    model.layer[1].shortcut = None  # a stride-2 block without its projection
    with pytest.raises(ConversionError) as caught:
        convert(model, _images(), degrees=2)
    (problem,) = caught.value.problems
    assert problem.path == "layer.1.add_1"
    assert problem.reason == (
        "the branches it sums have different shapes: branch 1 (layer.1.conv1 -> layer.1.bn1 -> "
        "layer.1.act1 -> layer.1.conv2 -> layer.1.bn2) outputs (8, 4, 4); branch 2 (identity) "
        "outputs (4, 8, 8)"
    )
    assert "projection" in problem.fix
    assert problem.reason in str(caught.value)


def test_in_place_changes_read_afterwards_are_refused() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc1(x)
            y.add_(x)  # the graph would still feed fc1's output to fc2
            return self.fc2(y)

    (problem,) = validate(InPlace(), (4,))
    assert problem.path == "add_"
    assert "overwrites fc1 in place, and fc2 read fc1 afterwards" in problem.reason
    # `out += identity` rebinds `out`: nothing reads the old value, which is fine.
    assert validate(ResidualCNN(nn.ReLU), (1, 8, 8)) == []


def test_untraceable_block_is_named_by_its_path() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 2))
    (problem,) = validate(model, (4,))
    assert problem.path == "1" and problem.layer == "Branchy"
    assert "cannot be traced" in problem.reason


def test_torch_layer_subclasses_stay_leaves() -> None:
    class MyConv(nn.Conv2d):
        """Keeps torch's forward: still a Conv2d to the converter."""

    model = nn.Sequential(MyConv(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    network, _ = convert(model, _images(), degrees=2)
    assert isinstance(network[0], nn.Conv2d) and network.paths[0] == "0"


def test_depth_is_the_longest_path() -> None:
    square = PolyActivation((0.0, 0.0, 1.0), -1, 1)
    linear = nn.Linear(2, 2)
    deep = ConvertedNetwork([("a", linear), ("b", square), ("c", linear), ("d", square)], (2,))
    shallow = ConvertedNetwork([("e", linear)], (2,))
    join = Residual([deep, shallow, ConvertedNetwork([], (2,))])
    assert depth_of([linear, join, square, linear]) == 3


def test_format_version_stays_1_without_residual_blocks() -> None:
    network, _ = convert(nn.Sequential(nn.Linear(6, 2)), _vectors())
    manifest, _ = converted_manifest(network, "net", labels=["a", "b"], preprocessing={})
    assert manifest["format_version"] == 1


class PooledShortcut(nn.Module):
    """A ResNet-D style block: the shortcut averages 2x2 windows, then projects with 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
        self.act = Square()
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.act(self.bn(self.conv(h)) + self.shortcut(h)).flatten(1))


def test_pooling_inside_a_branch_becomes_a_convolution(tmp_path: Path) -> None:
    model = _randomise(PooledShortcut(), 7)
    x = _images()
    network, report = convert(model, x)
    np.testing.assert_allclose(_outputs(network, x), _outputs(model, x), rtol=1e-10)
    join = network[1]
    assert isinstance(join, Residual)
    assert join.networks()[1].paths == ("shortcut.0", "shortcut.1")
    assert [c.new for c in report.changes[1].branches[1]] == [
        "conv2d 2->2 with fixed weights (average pooling)",
        "conv2d",
        "folded into shortcut.1",
    ]
    _round_trip(network, tmp_path, x, 2)
