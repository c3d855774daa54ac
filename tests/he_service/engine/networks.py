"""Random small networks built from the artifact layer kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from he_service.artifacts import Add, Conv2d, Flatten, Layer, Linear, ModelArtifact, Poly


def make_artifact(layers: list[Layer], input_shape: tuple[int, ...]) -> ModelArtifact:
    """Wrap layers in an artifact the way ``load_artifact`` would."""
    probe = ModelArtifact("random", "", input_shape, {}, tuple(layers), ("0",), {}, Path("."))
    outputs = probe.layer_shapes()[-1][0]
    return ModelArtifact(
        "random",
        "",
        input_shape,
        {},
        tuple(layers),
        tuple(map(str, range(outputs))),
        {},
        Path("."),
    )


def random_network(rng: np.random.Generator) -> tuple[ModelArtifact, np.ndarray]:
    """Return a random conv or MLP network with odd sizes, and one random input."""

    def poly() -> Poly:
        degree = int(rng.integers(2, 5))
        coeffs = [rng.normal() * 0.1, rng.normal() * 0.5, 0.2 + abs(rng.normal()) * 0.2]
        coeffs += [rng.normal() * 0.05 for _ in range(degree - 2)]
        return Poly(tuple(coeffs))

    layers: list[Layer] = []
    if rng.random() < 0.5:
        channels, size = int(rng.integers(1, 3)), int(rng.integers(5, 11))
        shape: tuple[int, ...] = (channels, size, size)
        for _ in range(int(rng.integers(1, 3))):
            out_ch, k = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
            layers += [
                Conv2d(
                    rng.normal(size=(out_ch, channels, k, k)) / k,
                    rng.normal(size=out_ch) * 0.1,
                    (stride, stride),
                    (pad, pad),
                ),
                poly(),
            ]
            size = (size + 2 * pad - k) // stride + 1
            channels = out_ch
        layers.append(Flatten())
        width = channels * size * size
    else:
        width = int(rng.integers(3, 40))
        shape = (width,)
    for _ in range(int(rng.integers(1, 3))):
        out = int(rng.integers(2, 24))
        weight = rng.normal(size=(out, width)) / np.sqrt(width)
        layers.append(Linear(weight, rng.normal(size=out) * 0.1))
        if rng.random() < 0.7:
            layers.append(poly())
        width = out
    outputs = int(rng.integers(2, 11))
    weight = rng.normal(size=(outputs, width)) / np.sqrt(width)
    layers.append(Linear(weight, rng.normal(size=outputs) * 0.1))
    return make_artifact(layers, shape), rng.normal(size=shape)


def random_residual_network(rng: np.random.Generator) -> tuple[ModelArtifact, np.ndarray]:
    """Return a random network with residual blocks (identity or projected skips), and an input.

    Convolutional blocks keep the shape (padding), vector blocks keep the width; blocks may
    nest, end with or without an activation, and pooling may sit inside a branch.
    """

    def poly() -> Poly:
        return Poly((rng.normal() * 0.1, rng.normal() * 0.5, 0.2 + abs(rng.normal()) * 0.2))

    def conv(channels_in: int, channels_out: int, k: int) -> Conv2d:
        weight = rng.normal(size=(channels_out, channels_in, k, k)) / (k * np.sqrt(channels_in))
        return Conv2d(weight, rng.normal(size=channels_out) * 0.1, (1, 1), (k // 2, k // 2))

    def block(channels: int, depth: int) -> Add:
        inner: list[Layer] = [conv(channels, channels, 3), poly(), conv(channels, channels, 3)]
        if depth < 1 and rng.random() < 0.4:
            inner = [block(channels, depth + 1), poly(), conv(channels, channels, 1)]
        skip: list[Layer] = [] if rng.random() < 0.6 else [conv(channels, channels, 1)]
        return Add((skip, tuple(inner)) if rng.random() < 0.5 else (tuple(inner), skip))

    layers: list[Layer] = []
    if rng.random() < 0.6:
        channels, size = int(rng.integers(1, 4)), int(rng.integers(4, 9))
        shape: tuple[int, ...] = (channels, size, size)
        layers += [conv(channels, channels + 1, 3), poly()]
        channels += 1
        for _ in range(int(rng.integers(1, 3))):
            layers.append(block(channels, 0))
            if rng.random() < 0.5:
                layers.append(poly())
        layers.append(Flatten())
        width = channels * size * size
    else:
        width = int(rng.integers(3, 20))
        shape = (width,)
        for _ in range(int(rng.integers(1, 3))):
            inner: tuple[Layer, ...] = (
                Linear(
                    rng.normal(size=(width, width)) / np.sqrt(width), rng.normal(size=width) * 0.1
                ),
                poly(),
                Linear(rng.normal(size=(width, width)) / np.sqrt(width), np.zeros(width)),
            )
            layers += [Add(((), inner)), poly()]
    outputs = int(rng.integers(2, 8))
    layers.append(Linear(rng.normal(size=(outputs, width)) / np.sqrt(width), np.zeros(outputs)))
    return make_artifact(layers, shape), rng.normal(size=shape)


def response_deviation(slots: np.ndarray, expected: np.ndarray, decoding: dict) -> float:
    """Return how far decrypted slots are from "the outputs, replicated, and zeros elsewhere".

    Output ``o`` may sit at every slot ``o + k * period``; every other slot must be zero, so the
    key owner learns the outputs and nothing else (no partial sums of weights times inputs).
    """
    period = int(decoding["period"])
    index = np.arange(slots.size) % period
    wanted = np.where(index < expected.size, expected[np.minimum(index, expected.size - 1)], 0.0)
    return float(np.abs(slots - wanted).max())
