"""Plaintext forward pass of an artifact in numpy: the ground truth for encrypted results."""

from __future__ import annotations

import numpy as np

from he_service.artifacts import Conv2d, Flatten, Linear, ModelArtifact, Poly
from he_service.protocol.encoding import im2col

__all__ = ["conv2d", "forward_plain"]


def conv2d(x: np.ndarray, layer: Conv2d) -> np.ndarray:
    """Return the convolution of one (C, H, W) sample, as torch computes it."""
    out_channels, _, kh, kw = layer.weight.shape
    patches = im2col(x, (kh, kw), layer.stride, layer.padding)
    out = layer.weight.reshape(out_channels, -1) @ patches + layer.bias[:, None]
    out_h = (x.shape[1] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
    return out.reshape(out_channels, out_h, -1)


def forward_plain(artifact: ModelArtifact, x: np.ndarray) -> np.ndarray:
    """Evaluate the polynomial network on one preprocessed sample.

    Args:
        artifact: the checked model.
        x: one sample in the model's input shape, already preprocessed.

    Returns:
        The output vector (logits).
    """
    value: np.ndarray = np.asarray(x, dtype=np.float64).reshape(artifact.input_shape)
    for layer in artifact.layers:
        if isinstance(layer, Conv2d):
            value = conv2d(value, layer)
        elif isinstance(layer, Flatten):
            value = value.reshape(-1)
        elif isinstance(layer, Linear):
            value = layer.weight @ value + layer.bias
        elif isinstance(layer, Poly):
            value = np.polynomial.polynomial.polyval(value, layer.coeffs)
    return value
