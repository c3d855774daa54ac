"""The validator: every unsupported layer is named, with its path, the reason and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ConversionError, Problem, Square, convert, validate


class ClampReLU(nn.Module):
    """A custom activation: the converter traces its forward and names the call inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            ClampReLU(),
        )
        self.rnn = nn.LSTM(36, 8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x, _ = self.rnn(x)
        x, _ = self.attention(x, x, x)
        return self.head(x)


def _by_path(problems: list[Problem]) -> dict[str, Problem]:
    return {p.path: p for p in problems}


def test_every_unsupported_layer_is_listed_with_its_path_and_alternative() -> None:
    problems = _by_path(validate(Unsupported(), (1, 8, 8)))
    assert set(problems) == {"features.2", "features.3.clamp", "rnn", "attention"}
    assert "AvgPool2d" in problems["features.2"].fix
    assert "MaxPool2d" in problems["features.2"].layer
    assert "Tensor.clamp() is not a supported" in problems["features.3.clamp"].reason
    assert "supported layers" in problems["features.3.clamp"].fix
    assert "additions and multiplications" in problems["rnn"].reason
    assert "Linear" in problems["rnn"].fix
    assert "softmax" in problems["attention"].reason


def test_convert_refuses_with_all_problems_at_once() -> None:
    with pytest.raises(ConversionError) as caught:
        convert(Unsupported(), np.zeros((4, 1, 8, 8)))
    assert len(caught.value.problems) == 4
    message = str(caught.value)
    for path in ("features.2", "features.3.clamp", "rnn", "attention"):
        assert f"  - {path} (" in message


@pytest.mark.parametrize(
    ("model", "shape", "path", "words"),
    [
        (
            nn.Sequential(
                nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)
            ),
            (4,),
            "2",
            "no linear map to fold it into",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4)),
            (4,),
            "2",
            "ends the network",
        ),
        (
            nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()),
            (1, 4, 4),
            "0",
            "pads with zeros",
        ),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), (4,), "0", "at the start"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), (4,), "2", "another activation"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), (1, 4, 4), "1", "nn.Flatten()"),
        (nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=1)), (4,), "1", "softmax"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), "1", "its own statistics"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(1)), (1, 4, 4), "1", "max"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="circular")), (1, 4, 4), "0", "circular"),
        (nn.Sequential(nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 2)), (4,), "1", "per channel"),
    ],
)
def test_structural_problems(
    model: nn.Module, shape: tuple[int, ...], path: str, words: str
) -> None:
    problems = validate(model, shape)
    assert any(p.path == path and words in str(p) for p in problems), problems


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class FunctionalMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(self.conv(x), 2).flatten(1))


def test_untraceable_forward_is_refused() -> None:
    (problem,) = validate(DataDependent(), (4,))
    assert problem.path == "forward" and "cannot be traced" in problem.reason


def test_functional_max_pool_is_named_by_its_call() -> None:
    (problem,) = validate(FunctionalMax(), (1, 4, 4))
    assert problem.path == "max_pool2d"
    assert "AvgPool2d" in problem.fix


class Functional(nn.Module):
    """Calls written in forward: flatten, view, torch.relu, x * x, F.leaky_relu, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * x
        x = x.view(x.size(0), -1)
        x = F.dropout(torch.relu(self.fc1(x)), 0.5, training=False)
        x = F.leaky_relu(self.fc2(x), 0.1)
        return self.fc3(x.flatten(1))


def test_calls_in_forward_are_recognised() -> None:
    assert validate(Functional(), (1, 4, 4)) == []
    network, report = convert(Functional(), np.random.default_rng(0).normal(size=(32, 1, 4, 4)))
    kinds = [type(m).__name__ for m in network]
    assert kinds == [
        "Conv2d",
        "PolyActivation",
        "Flatten",
        "Linear",
        "PolyActivation",
        "Linear",
        "PolyActivation",
        "Flatten",
        "Linear",
    ]
    assert network[1].coeffs == (0.0, 0.0, 1.0)  # x * x stays exact
    assert [a.replaces for a in report.activations] == [
        "torch.relu(x)",
        "F.leaky_relu(x, negative_slope=0.1)",
    ]


def test_validate_does_not_touch_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), Square(), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert validate(model, (4,)) == []
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_refuses_unsupported_layers_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.cli import main

    (tmp_path / "unsupported_net.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(),\n"
        "                         nn.LSTM(2, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.LSTM(2, 2))
    torch.save(module.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 6, 6)))
    out = tmp_path / "out"
    argv = ["convert", "unsupported_net:make", "--weights", "w.pt", "--calibration", "x.npy"]
    code = main([*argv, "--name", "bad-net", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 (MaxPool2d" in err and "AvgPool2d" in err
    assert "3 (LSTM" in err
    assert "Traceback" not in err
    assert not out.exists()


class MeanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_mean_in_forward_points_to_adaptive_pooling() -> None:
    (problem,) = validate(MeanHead(), (1, 4, 4))
    assert problem.path == "mean"
    assert "nn.AdaptiveAvgPool2d(1) and nn.Flatten()" in problem.fix
