"""The normalised graph computes exactly what the artifact's layers compute."""

from __future__ import annotations

import numpy as np
import pytest

from he_service.artifacts import Conv2d, Flatten, Linear, Poly
from he_service.engine import forward_plain
from he_service.engine.graph import LinearNode, PolyNode, build_graph
from he_service.engine.ops import Conv, Dense, Pool, Reshape

from .networks import make_artifact, random_network, random_residual_network


@pytest.mark.parametrize("seed", range(30))
def test_random_networks_normalise_exactly(seed: int) -> None:
    artifact, x = random_network(np.random.default_rng(seed))
    graph = build_graph(artifact)
    np.testing.assert_allclose(graph.forward(x), forward_plain(artifact, x), atol=1e-9)
    assert graph.is_chain()


@pytest.mark.parametrize("seed", range(30))
def test_random_residual_networks_normalise_exactly(seed: int) -> None:
    artifact, x = random_residual_network(np.random.default_rng(seed))
    graph = build_graph(artifact)
    np.testing.assert_allclose(graph.forward(x), forward_plain(artifact, x), atol=1e-9)
    for node in graph.nodes:
        if isinstance(node, LinearNode):
            for term in node.terms:
                assert term.chain.multiplications == 1, term.chain.describe()


def test_average_pooling_becomes_a_window_sum_beside_the_next_map() -> None:
    rng = np.random.default_rng(0)
    pool = np.zeros((3, 3, 2, 2))
    for c, factor in enumerate((0.25, 0.5, -0.1)):  # an average pool with BatchNorm folded in
        pool[c, c] = factor
    artifact = make_artifact(
        [
            Conv2d(rng.normal(size=(3, 1, 3, 3)), rng.normal(size=3), (1, 1), (0, 0)),
            Poly((0.0, 0.3, 0.2)),
            Conv2d(pool, np.array([0.1, 0.0, 0.2]), (2, 2), (0, 0)),
            Conv2d(rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4), (1, 1), (1, 1)),
            Poly((0.0, 0.3, 0.2)),
            Conv2d(
                np.eye(4)[:, :, None, None] * np.full((2, 2), 0.25), np.zeros(4), (2, 2), (0, 0)
            ),
            Flatten(),
            Linear(rng.normal(size=(5, 64)), rng.normal(size=5)),
        ],
        (1, 18, 18),
    )
    graph = build_graph(artifact)
    second = graph.nodes[3]
    assert isinstance(second, LinearNode)
    assert [type(op) for op in second.terms[0].chain.ops] == [Pool, Conv]
    last = graph.nodes[-1]
    assert isinstance(last, LinearNode)
    assert [type(op) for op in last.terms[0].chain.ops] == [Pool, Reshape, Dense]
    x = rng.normal(size=(1, 18, 18))
    np.testing.assert_allclose(graph.forward(x), forward_plain(artifact, x), atol=1e-9)


def test_activations_fold_their_scale_shift_and_constant_into_neighbours() -> None:
    rng = np.random.default_rng(1)
    artifact = make_artifact(
        [
            Linear(rng.normal(size=(4, 3)), rng.normal(size=4)),
            Poly((0.5, -1.0, 2.0)),  # 2 (x - 0.25)^2 + 0.375
            Linear(rng.normal(size=(2, 4)), rng.normal(size=2)),
        ],
        (3,),
    )
    graph = build_graph(artifact)
    assert [type(n).__name__ for n in graph.nodes] == [
        "InputNode",
        "LinearNode",
        "PolyNode",
        "LinearNode",
    ]
    poly = graph.nodes[2]
    assert isinstance(poly, PolyNode) and poly.step.degree == 2
    last = graph.nodes[3]
    assert isinstance(last, LinearNode) and isinstance(last.terms[0].chain.ops[0], Dense)
    assert graph.depth == 1
