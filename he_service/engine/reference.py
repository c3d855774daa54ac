"""Plaintext forward pass of an artifact in numpy: the ground truth for encrypted results."""

from __future__ import annotations

import numpy as np

from he_service.artifacts import Add, Conv2d, Flatten, Layer, Linear, ModelArtifact, Poly

__all__ = ["conv2d", "forward_plain"]


def conv2d(x: np.ndarray, layer: Conv2d) -> np.ndarray:
    """Return the convolution of one (C, H, W) sample, as torch computes it."""
    out_channels, _, kh, kw = layer.weight.shape
    patches = _im2col(x, (kh, kw), layer.stride, layer.padding)
    out = layer.weight.reshape(out_channels, -1) @ patches + layer.bias[:, None]
    out_h = (x.shape[1] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
    return np.asarray(out.reshape(out_channels, out_h, -1))


def _im2col(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    """Return the (C*kh*kw, windows) patch matrix of a (C, H, W) image, torch's weight order."""
    channels, height, width = x.shape
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out_h = (height + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    rows = np.empty((channels, kh, kw, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            rows[:, i, j] = padded[
                :, i : i + stride[0] * out_h : stride[0], j : j + stride[1] * out_w : stride[1]
            ]
    return rows.reshape(channels * kh * kw, out_h * out_w)


def forward_plain(artifact: ModelArtifact, x: np.ndarray) -> np.ndarray:
    """Evaluate the polynomial network on one preprocessed sample.

    Args:
        artifact: the checked model.
        x: one sample in the model's input shape, already preprocessed.

    Returns:
        The output vector (logits).
    """
    value: np.ndarray = np.asarray(x, dtype=np.float64).reshape(artifact.input_shape)
    return _chain(artifact.layers, value)


def _chain(layers: tuple[Layer, ...], value: np.ndarray) -> np.ndarray:
    for layer in layers:
        if isinstance(layer, Conv2d):
            value = conv2d(value, layer)
        elif isinstance(layer, Flatten):
            value = value.reshape(-1)
        elif isinstance(layer, Linear):
            value = layer.weight @ value + layer.bias
        elif isinstance(layer, Poly):
            value = np.polynomial.polynomial.polyval(value, layer.coeffs)
        elif isinstance(layer, Add):
            start = value
            value = sum((_chain(branch, start) for branch in layer.branches), np.zeros(()))
    return value
