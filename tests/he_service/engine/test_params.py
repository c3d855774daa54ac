"""CKKS parameters: rings, prime chains and regimes at 128-bit security."""

import numpy as np
import pytest

from he_service.artifacts import Linear, Poly
from he_service.engine.graph import build_graph
from he_service.engine.params import REGIMES, choose_chains, level_primes, max_depth_by_ring
from he_service.protocol import seal_context
from he_service.protocol.params import MAX_COEFF_BITS_128

from .networks import make_artifact


def _graph(*coeffs: tuple[float, ...]):  # type: ignore[no-untyped-def]
    layers = []
    for c in coeffs:
        layers += [Linear(np.eye(4), np.zeros(4)), Poly(c)]
    return build_graph(make_artifact([*layers, Linear(np.eye(4), np.zeros(4))], (4,)))


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: r.name)
@pytest.mark.parametrize(
    ("coeffs", "degree"),
    [
        ([], 4096),
        ([(0.0, 0.0, 1.0)], 8192),
        ([(0.0, 0.0, 1.0)] * 2, 8192),
        ([(0.0, 1.0, 2.0, 0.5), (1.0, 0.0, 2.0, 0.0, 1.0)], 16384),
        ([(0.0, 0.0, 1.0)] * 5, 16384),
    ],
)
def test_smallest_ring_that_holds_the_graph(regime, coeffs, degree: int) -> None:  # type: ignore[no-untyped-def]
    graph = _graph(*coeffs)
    found = next(
        (
            choices[0]
            for n in (4096, 8192, 16384, 32768)
            if (choices := choose_chains(graph, regime, n))
        ),
        None,
    )
    assert found is not None
    params = found.params
    assert params.poly_modulus_degree <= degree
    assert params.depth == graph.depth  # one prime per level
    assert sum(params.coeff_modulus_bits) <= MAX_COEFF_BITS_128[params.poly_modulus_degree]
    assert max(params.coeff_modulus_bits) <= 60
    if regime.allow_babies:  # rotating at rest: key switching must stay below the rescale noise
        assert max(params.coeff_modulus_bits[:-1]) <= params.coeff_modulus_bits[-1] - 8
    assert seal_context(params).parameters_set()  # SEAL itself accepts it at 128-bit
    assert len(level_primes(graph, found.precision)) == graph.depth + 1


def test_depth_limits_grow_with_the_ring() -> None:
    limits = max_depth_by_ring()
    assert limits[8192] < limits[16384] < limits[32768]
