"""Network architectures of the shipped models, trained with ReLU and then converted.

CKKS can add and multiply encrypted numbers but cannot compare them, so ReLU and max-pooling
cannot run on ciphertexts as they are. The shipped models are trained as ordinary ReLU networks
(with BatchNorm and average pooling where it helps) and then converted by ``models.convert``:
BatchNorm folds into the neighbouring layer, pooling becomes a convolution, ReLU becomes a
fitted polynomial. ``Square`` (x * x) is kept as is by the converter.
"""

from __future__ import annotations

import torch
from torch import nn

from models.polynomial import relu_square

__all__ = [
    "BasicBlock",
    "BreastCancerDPMLP",
    "BreastCancerMLP",
    "DigitsCNN",
    "DigitsResNet",
    "LeNet5",
    "MnistDPCNN",
    "MnistReluCNN",
    "Square",
]


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


class MnistReluCNN(nn.Module):
    """TenSEAL's tutorial CNN with ReLU: the network that ``mnist-cnn`` is converted from.

    ``conv 1->4, 7x7, stride 3`` -> ReLU -> flatten -> ``linear 256->64`` -> ReLU ->
    ``linear 64->10``; the flatten is a call in ``forward``, which the converter traces.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=7, stride=3, padding=0)
        self.act1 = nn.ReLU()
        self.fc1 = nn.Linear(256, 64)
        self.act2 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits for preprocessed images shaped (n, 1, 28, 28).

        Args:
            x: preprocessed images.

        Returns:
            Logits shaped (n, 10).
        """
        x = self.act1(self.conv1(x)).flatten(1)
        logits: torch.Tensor = self.fc2(self.act2(self.fc1(x)))
        return logits


class DigitsCNN(nn.Sequential):
    """A small CNN for scikit-learn's 8x8 digits, with BatchNorm and average pooling.

    ``conv 1->8 3x3 pad 1`` -> BN -> ReLU -> avgpool 2 (8x4x4) -> ``conv 8->16 3x3`` -> BN ->
    ReLU -> flatten (16x2x2) -> dropout -> ``linear 64->10``. Converted, the pooling merges
    with the second convolution, so the depth is 5: three linear maps and two squares. The
    unpadded second convolution keeps the hidden vector at 64 values, which halves the
    rotations of the encrypted evaluation compared with a padded one (256 values).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(64, 10)


class BreastCancerMLP(nn.Sequential):
    """An MLP for the 30 standardised breast cancer features, with BatchNorm1d.

    ``linear 30->16`` -> BN -> ReLU -> dropout -> ``linear 16->8`` -> BN -> ReLU ->
    ``linear 8->2``: depth 5 once converted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(8, 2)


class LeNet5(nn.Sequential):
    """LeNet-5 for 28x28 MNIST, with BatchNorm and average pooling.

    ``conv 1->6 5x5`` -> BN -> ReLU -> avgpool 2 (6x12x12) -> ``conv 6->16 5x5`` -> BN ->
    ReLU -> avgpool 2 (16x4x4) -> flatten -> ``linear 256->120`` -> ReLU -> ``linear 120->84``
    -> ReLU -> ``linear 84->10``. Converted with degree-2 polynomials its depth is 4 (each
    pooling merges into the next linear map); BatchNorm keeps the squares' inputs near the
    range the polynomials were fitted on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(256, 120)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.act4 = nn.ReLU()
        self.fc3 = nn.Linear(84, 10)


class BasicBlock(nn.Module):
    """A ResNet basic block with an identity shortcut: ``relu(x + bn(conv(relu(bn(conv(x))))))``.

    Both convolutions are 3x3 with padding 1 and keep the channels, so the shortcut needs no
    projection.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: feature maps (n, channels, height, width).

        Returns:
            Feature maps of the same shape.
        """
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        result: torch.Tensor = self.act2(x + out)
        return result


class DigitsResNet(nn.Sequential):
    """A small residual CNN for scikit-learn's 8x8 digits.

    ``conv 1->8 3x3 pad 1`` -> BN -> ReLU -> avgpool 2 (8x4x4) -> ``BasicBlock(8)`` ->
    avgpool 2 (8x2x2) -> flatten -> ``linear 32->10``. Converted with degree-2 polynomials its
    depth is 3 (the block's inner activation and the one after its sum share the longest path
    with the stem's); 8 channels of 4x4 keep the encrypted plan small.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.block = BasicBlock(8)
        self.pool2 = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, 10)


class BreastCancerDPMLP(nn.Sequential):
    """An MLP for differentially private training on the 30 breast cancer features.

    ``linear 30->8`` -> ``relu_square(4)`` -> ``linear 8->2``: no BatchNorm (it mixes records,
    which DP-SGD cannot account for) and a fixed polynomial activation, trained directly, so
    there is no conversion and no range to calibrate on private data. Depth 1. Few parameters
    suit DP-SGD, whose noise grows with the number of parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 8)
        self.act1 = relu_square(4.0)
        self.fc2 = nn.Linear(8, 2)


class MnistDPCNN(nn.Sequential):
    """The ``mnist-cnn`` shape for differentially private training, with fixed polynomials.

    ``conv 1->4, 7x7, stride 3`` -> ``relu_square(4)`` -> flatten -> ``linear 256->64`` ->
    ``relu_square(4)`` -> ``linear 64->10``: depth 2, trained directly with its activations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=7, stride=3, padding=0)
        self.act1 = relu_square(4.0)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(256, 64)
        self.act2 = relu_square(4.0)
        self.fc2 = nn.Linear(64, 10)
