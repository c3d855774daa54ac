"""Network architectures that CKKS can evaluate: only affine layers and polynomial activations.

CKKS can add and multiply encrypted numbers but cannot compare them, so ReLU and max-pooling
are out; ``x * x`` is the cheapest non-linearity and costs one multiplicative level.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistCNN", "Square"]


class Square(nn.Module):
    """Element-wise square, the polynomial activation ``x ** 2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * x``.

        Args:
            x: any tensor.

        Returns:
            A tensor of the same shape.
        """
        return x * x


class MnistCNN(nn.Module):
    """The CNN of TenSEAL's encrypted MNIST tutorial.

    ``conv 1->4, 7x7, stride 3`` (28x28 -> 4x8x8) -> ``x^2`` -> flatten (C, H, W order, 256)
    -> ``linear 256->64`` -> ``x^2`` -> ``linear 64->10``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=7, stride=3, padding=0)
        self.act1 = Square()
        self.fc1 = nn.Linear(256, 64)
        self.act2 = Square()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class scores (logits) for a batch of preprocessed images.

        Args:
            x: preprocessed images shaped (n, 1, 28, 28).

        Returns:
            Logits shaped (n, 10).
        """
        x = self.act1(self.conv1(x))
        # flatten(1) keeps torch's C, H, W order, which the manifest's "flatten" layer promises.
        x = x.flatten(1)
        x = self.act2(self.fc1(x))
        logits: torch.Tensor = self.fc2(x)
        return logits
