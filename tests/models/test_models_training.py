"""Architecture shape and the side-effect-free determinism guard."""

from __future__ import annotations

import torch

from models.architectures import MnistCNN, Square
from models.training import deterministic_torch


def test_mnist_cnn_shapes() -> None:
    model = MnistCNN()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # conv 7x7 stride 3 on 28x28 gives 8x8, times 4 channels: the 256 inputs of fc1.
    assert model.conv1(torch.zeros(1, 1, 28, 28)).flatten(1).shape == (1, 256)
    assert torch.equal(Square()(torch.tensor([-2.0, 3.0])), torch.tensor([4.0, 9.0]))


def test_deterministic_torch_restores_global_state() -> None:
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with deterministic_torch(123):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        first = torch.rand(3)
    with deterministic_torch(123):
        assert torch.equal(torch.rand(3), first)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)
