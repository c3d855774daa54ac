"""Architectures, preprocessing and the side-effect-free determinism guard."""

from __future__ import annotations

import numpy as np
import torch

from he_service.protocol import preprocess
from models.architectures import BreastCancerMLP, DigitsCNN, MnistReluCNN, Square
from models.training import deterministic_torch, preprocess_batch


def test_mnist_cnn_shapes() -> None:
    model = MnistReluCNN()
    # conv 7x7 stride 3 on 28x28 gives 8x8, times 4 channels: the 256 inputs of fc1.
    assert model.conv1(torch.zeros(1, 1, 28, 28)).flatten(1).shape == (1, 256)
    assert torch.equal(Square()(torch.tensor([-2.0, 3.0])), torch.tensor([4.0, 9.0]))


def test_relu_architectures_shapes() -> None:
    assert MnistReluCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert DigitsCNN().eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert BreastCancerMLP().eval()(torch.zeros(2, 30)).shape == (2, 2)


def test_preprocess_batch_is_what_the_client_sends() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 2, 4, 4)).astype(np.float32)
    spec = {"scale": 1 / 255, "mean": [0.1, 0.2], "std": [0.3, 0.4]}
    batch = preprocess_batch(images, spec, (2, 4, 4))
    for image, row in zip(images, batch, strict=True):
        assert np.array_equal(row, preprocess(image, spec, (2, 4, 4)))
    features = rng.normal(size=(3, 5)) * 100
    spec = {"scale": 1.0, "mean": list(rng.normal(size=5)), "std": list(rng.random(5) + 0.5)}
    batch = preprocess_batch(features, spec, (5,))
    for sample, row in zip(features, batch, strict=True):
        assert np.array_equal(row, preprocess(sample, spec, (5,)))


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
