"""What a batch plan is: the exact float network and the integer layers the evaluator runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from he_service.engine.poly import PolyStep
from he_service.protocol.params import CkksParams

__all__ = ["BatchAffine", "BatchLayer", "BatchPlan", "BatchPoly", "FloatAffine"]


@runtime_checkable
class FloatAffine(Protocol):
    """An affine map from ``normalise``: ``matrix`` (out, in) and ``bias`` (out,).

    A protocol because the compiler's class for it is private.
    """

    matrix: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class BatchAffine:
    """``y = weights @ x[inputs] / weight_scale + bias``, weights integer-valued.

    ``inputs`` picks the ciphertexts of the previous vector that the columns read (units whose
    weights all round to zero are pruned). Rows of the last map whose weights are all zero are
    constant outputs.
    """

    weights: np.ndarray
    weight_scale: float
    bias: np.ndarray
    inputs: tuple[int, ...]
    rescales: int
    description: str

    @property
    def scalar_multiplications(self) -> int:
        return int(np.count_nonzero(self.weights))

    def simulate(self, x: np.ndarray) -> np.ndarray:
        columns = x[list(self.inputs)] if self.inputs else np.zeros((0, x.shape[1]))
        return (self.weights @ columns) / self.weight_scale + self.bias[:, None]


@dataclass(frozen=True)
class BatchPoly:
    """``y = sum_i coeffs[i] x^i`` element-wise, degree 2 to 4 (lowest coefficient first).

    The top coefficient costs nothing: a ciphertext of ``x^d`` at scale ``S^d`` *is* one of
    ``a_d x^d`` at scale ``S^d / |a_d|`` (negated if ``a_d < 0``). Lower terms are scalar
    products at the output scale.
    """

    coeffs: tuple[float, ...]
    description: str

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.polynomial.polynomial.polyval(x, self.coeffs))


BatchLayer = BatchAffine | BatchPoly


@dataclass(frozen=True)
class BatchPlan:
    """A model compiled for one-sample-per-slot evaluation.

    ``steps`` are the normalised float maps and polynomial steps (the exact network);
    ``layers`` are what the evaluator runs (integer weights, pruned units).
    """

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[FloatAffine | PolyStep, ...]
    layers: tuple[BatchLayer, ...]
    input_length: int
    output_length: int

    @property
    def slot_count(self) -> int:
        return self.params.slot_count

    @property
    def depth(self) -> int:
        """Return how many rescales (primes dropped) an evaluation performs."""
        return sum(layer.rescales for layer in self.layers if isinstance(layer, BatchAffine))

    def simulate(self, features: np.ndarray, *, quantised: bool = False) -> np.ndarray:
        """Run the network on plain features, one sample per column.

        Args:
            features: an array (input_length, samples).
            quantised: use the integer weights the evaluator uses (what decryption returns,
                up to CKKS noise) instead of the exact float network.

        Returns:
            An array (output_length, samples).
        """
        value = np.asarray(features, dtype=np.float64)
        if value.ndim != 2 or value.shape[0] != self.input_length:
            raise ValueError(
                f"features must have shape ({self.input_length}, samples), got {value.shape}"
            )
        if quantised:
            for layer in self.layers:
                value = layer.simulate(value)
            return value
        for step in self.steps:
            if isinstance(step, FloatAffine):
                value = step.matrix @ value + step.bias[:, None]
            else:
                value = step.simulate(value)
        return value

    def costs(self) -> dict[str, int]:
        """Return what one full group of samples costs in bytes: keys, request, response."""
        output_primes = self.params.data_primes - self.depth
        return {
            "public_key_bytes": self.params.public_context_bytes(0),
            "request_bytes_per_group": self.input_length
            * self.params.ciphertext_bytes(seeded=True),
            "response_bytes_per_group": self.output_length
            * self.params.ciphertext_bytes(output_primes),
        }

    def summary(self) -> dict[str, Any]:
        """Return operation counts for one full group of samples, and the parameters."""
        width = self.input_length
        products = relins = scalar = size = 0
        for layer in self.layers:
            if isinstance(layer, BatchAffine):
                width = layer.weights.shape[0]
                scalar += layer.scalar_multiplications
                relins += width if size == 3 else 0  # the previous products, relinearized here
                size = 2
                continue
            lower = sum(1 for c in layer.coeffs[1:-1] if c != 0)
            cubed = layer.degree == 3 or (layer.degree == 4 and layer.coeffs[3] != 0)
            products += width * (1 + (layer.degree == 4) + cubed)
            relins += width * (layer.degree > 2)
            scalar += width * lower
            size = 3
        return {
            **self.costs(),
            "mode": "batch",
            "samples_per_request": self.slot_count,
            "input_ciphertexts": self.input_length,
            "output_ciphertexts": self.output_length,
            "depth": self.depth,
            "rotations": 0,
            "ciphertext_multiplications": products,
            "relinearizations": relins,
            "rescales": self._rescale_count(),
            "scalar_multiplications": scalar,
            "steps": [layer.description for layer in self.layers],
            "parameters": self.params_reason,
        }

    def _rescale_count(self) -> int:
        return sum(
            layer.rescales * layer.weights.shape[0]
            for layer in self.layers
            if isinstance(layer, BatchAffine)
        )
