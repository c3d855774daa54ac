"""What a batch plan is: the exact float network and the integer layers the evaluator runs.

Both are lists in the order of the normalised graph (``graph.py``) without its input node:
``steps[i]`` and ``layers[i]`` are the same node, exact and integer. A step or layer reads
earlier ones by index; ``INPUT`` (-1) is the request's ciphertexts, one per input feature.
The last one is the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from he_service.engine.poly import PolyStep
from he_service.protocol.params import CkksParams

__all__ = [
    "INPUT",
    "BatchAffine",
    "BatchLayer",
    "BatchPlan",
    "BatchPoly",
    "BatchTerm",
    "FloatLinear",
    "FloatPoly",
    "FloatStep",
    "ciphertext_sizes",
]

INPUT = -1


@dataclass(frozen=True, eq=False)
class FloatLinear:
    """``y = sum_t matrix_t @ x[source_t] + bias``: one node of the exact network."""

    terms: tuple[tuple[int, np.ndarray], ...]  # (source, dense matrix (out, source length))
    bias: np.ndarray


@dataclass(frozen=True, eq=False)
class FloatPoly:
    """A polynomial step applied element-wise to step ``source`` (always a ``FloatLinear``)."""

    source: int
    step: PolyStep


FloatStep = FloatLinear | FloatPoly


@dataclass(frozen=True, eq=False)
class BatchTerm:
    """One summand of an affine layer: ``weights @ x[inputs] / weight_scale``.

    ``x`` is layer ``source``'s value (``INPUT``: the request). Before the product, the
    source's ciphertexts are brought down to the layer's level: one step per prime in
    between, a rescale where ``align`` says True (divides the scale by that prime), a modulus
    switch otherwise (keeps it). ``source_scale`` is their exact scale then. The integer
    products are multiplied by ``2^shift`` (exact modular arithmetic), which multiplies their
    scale as well, so that every term of a layer lands on the layer's product scale,
    ``source_scale * weight_scale * 2^shift``, without changing the value it encodes.
    """

    source: int
    inputs: tuple[int, ...]  # which ciphertexts of the source value the columns read
    weights: np.ndarray  # (rows, len(inputs)), integer-valued
    weight_scale: float
    shift: int
    align: tuple[bool, ...]
    source_scale: float

    @property
    def scalar_multiplications(self) -> int:
        return int(np.count_nonzero(self.weights))

    def simulate(self, x: np.ndarray) -> np.ndarray:
        columns = x[list(self.inputs)] if self.inputs else np.zeros((0, x.shape[1]))
        return np.asarray((self.weights @ columns) / self.weight_scale)


@dataclass(frozen=True, eq=False)
class BatchAffine:
    """``y = sum of terms + bias``, at ``level`` (primes dropped before it), then ``rescales``.

    Units whose weights all round to zero are pruned from hidden layers; rows of the last
    layer whose weights are all zero are constant outputs.
    """

    terms: tuple[BatchTerm, ...]
    bias: np.ndarray
    level: int
    scale: float  # of the products, before the rescales
    rescales: int
    description: str

    @property
    def rows(self) -> int:
        return int(self.bias.shape[0])

    @property
    def scalar_multiplications(self) -> int:
        return sum(term.scalar_multiplications for term in self.terms)

    def constant_rows(self) -> np.ndarray:
        """Return the rows no term has a weight in."""
        live = np.zeros(self.rows, dtype=bool)
        for term in self.terms:
            live |= np.any(term.weights != 0, axis=1)
        return np.flatnonzero(~live)

    def simulate(self, values: dict[int, np.ndarray], samples: int) -> np.ndarray:
        total = np.repeat(self.bias[:, None], samples, axis=1)
        for term in self.terms:
            total = total + term.simulate(values[term.source])
        return total


@dataclass(frozen=True, eq=False)
class BatchPoly:
    """``y = sum_i coeffs[i] x^i`` element-wise on layer ``source``, degree 2 to 4.

    The top coefficient costs nothing: a ciphertext of ``x^d`` at scale ``S^d`` *is* one of
    ``a_d x^d`` at scale ``S^d / |a_d|`` (negated if ``a_d < 0``). Lower terms are scalar
    products at the output scale.
    """

    coeffs: tuple[float, ...]  # lowest first
    description: str
    source: int = INPUT

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.polynomial.polynomial.polyval(x, self.coeffs))


BatchLayer = BatchAffine | BatchPoly


def ciphertext_sizes(layers: tuple[BatchLayer, ...]) -> dict[int, int]:
    """Return the polynomials per ciphertext of every value (``INPUT`` included).

    An activation's top product is left unrelinearized (3); an affine layer relinearizes its
    outputs (2) when a term read such ciphertexts; the request's are fresh (2).
    """
    sizes = {INPUT: 2}
    for index, layer in enumerate(layers):
        sizes[index] = 3 if isinstance(layer, BatchPoly) else 2
    return sizes


def _relinearizes(layer: BatchAffine, sizes: dict[int, int]) -> bool:
    return any(sizes[term.source] == 3 for term in layer.terms)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """A model compiled for one-sample-per-slot evaluation.

    ``steps`` are the normalised float maps and polynomial steps (the exact network);
    ``layers`` are what the evaluator runs (integer weights, pruned units), one per step.
    """

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[FloatStep, ...]
    layers: tuple[BatchLayer, ...]
    input_length: int
    output_length: int

    @property
    def slot_count(self) -> int:
        return self.params.slot_count

    @property
    def depth(self) -> int:
        """Return how many primes the outputs have dropped (the deepest path's rescales)."""
        last = self.layers[-1]
        assert isinstance(last, BatchAffine)
        return last.level + last.rescales

    def readers(self) -> dict[int, list[int]]:
        """Return, for every value (``INPUT`` included), the layers that read it, in order."""
        found: dict[int, list[int]] = {INPUT: []}
        for index, layer in enumerate(self.layers):
            found[index] = []
            sources = (
                [layer.source]
                if isinstance(layer, BatchPoly)
                else [term.source for term in layer.terms]
            )
            for source in sources:
                if index not in found[source]:
                    found[source].append(index)
        return found

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
        values = {INPUT: value}
        samples = value.shape[1]
        if quantised:
            for index, layer in enumerate(self.layers):
                if isinstance(layer, BatchPoly):
                    values[index] = layer.simulate(values[layer.source])
                else:
                    values[index] = layer.simulate(values, samples)
            return values[len(self.layers) - 1]
        for index, step in enumerate(self.steps):
            if isinstance(step, FloatPoly):
                values[index] = step.step.simulate(values[step.source])
                continue
            total = np.repeat(step.bias[:, None], samples, axis=1)
            for source, matrix in step.terms:
                total = total + matrix @ values[source]
            values[index] = total
        return values[len(self.steps) - 1]

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
        sizes = ciphertext_sizes(self.layers)
        widths = {INPUT: self.input_length}
        products = relins = scalar = 0
        for index, layer in enumerate(self.layers):
            if isinstance(layer, BatchAffine):
                widths[index] = layer.rows
                scalar += layer.scalar_multiplications
                relins += layer.rows if _relinearizes(layer, sizes) else 0  # deferred to here
                continue
            width = widths[index] = widths[layer.source]
            lower = sum(1 for c in layer.coeffs[1:-1] if c != 0)
            cubed = layer.degree == 3 or (layer.degree == 4 and layer.coeffs[3] != 0)
            products += width * (1 + (layer.degree == 4) + cubed)
            relins += width * (layer.degree > 2)
            scalar += width * lower
        joins = sum(
            1 for layer in self.layers if isinstance(layer, BatchAffine) and len(layer.terms) > 1
        )
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
            **({"residual_joins": joins} if joins else {}),
            "steps": [layer.description for layer in self.layers],
            "parameters": self.params_reason,
        }

    def _rescale_count(self) -> int:
        """Return the rescales of one evaluation: after affine maps, and aligning joins."""
        count = 0
        for layer in self.layers:
            if isinstance(layer, BatchAffine):
                count += layer.rescales * layer.rows
                count += sum(len(t.inputs) * sum(t.align) for t in layer.terms)
        return count
