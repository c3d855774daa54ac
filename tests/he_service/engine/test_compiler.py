"""Plans compile from artifacts and compute exactly what the network computes (simulated)."""

import numpy as np
import pytest

from he_service.artifacts import Conv2d, Flatten, Linear, Poly
from he_service.engine import CompileError, ParameterError, compile_plan, forward_plain
from he_service.engine.params import REGIMES
from he_service.engine.plan import LinearStep, PolyApply
from he_service.protocol import decode_output, encode_input

from .networks import make_artifact, random_network, random_residual_network, response_deviation


def _check(artifact, x, plan) -> None:  # type: ignore[no-untyped-def]
    slots = plan.simulate(encode_input(x, plan.input_encoding))
    expected = forward_plain(artifact, x)
    np.testing.assert_allclose(decode_output(slots, plan.output_decoding), expected, atol=1e-9)
    # The response must carry the outputs and nothing else (no partial sums of weights).
    assert response_deviation(slots, expected, plan.output_decoding) < 1e-9


@pytest.mark.parametrize("seed", range(30))
def test_random_networks_compile_to_plans_that_match_the_plain_network(seed: int) -> None:
    artifact, x = random_network(np.random.default_rng(seed))
    _check(artifact, x, compile_plan(artifact))


@pytest.mark.parametrize("seed", range(12))
def test_random_residual_networks_compile_exactly(seed: int) -> None:
    artifact, x = random_residual_network(np.random.default_rng(seed))
    plan = compile_plan(artifact)
    _check(artifact, x, plan)
    joins = [s for s in plan.steps if isinstance(s, LinearStep) and len(s.terms) > 1]
    assert joins, "a residual network has a join of two terms"


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: r.name)
@pytest.mark.parametrize("seed", [3, 11, 17])
def test_both_regimes_compile_exactly(regime, seed: int) -> None:  # type: ignore[no-untyped-def]
    artifact, x = random_network(np.random.default_rng(seed))
    plan = compile_plan(artifact, regimes=(regime,))
    assert plan.estimates["regime"] == regime.name
    _check(artifact, x, plan)
    on_inputs = [r for s in plan.linear_steps() for r in s.rotations() if not r.on_product]
    assert regime.allow_babies or not on_inputs  # products regime: never rotate at rest


def test_mnist_plan_shape(mnist_artifact) -> None:  # type: ignore[no-untyped-def]
    plan = compile_plan(mnist_artifact)
    assert plan.params.poly_modulus_degree == 8192
    # Lazy rescaling: one prime per square plus the output prime, and the special prime.
    assert len(plan.params.coeff_modulus_bits) == 4
    assert sum(plan.params.coeff_modulus_bits) <= 218
    assert plan.input_ciphertexts == 4
    # The tutorial's mm alone costs 256 + 64 rotations; the first engine took 44.
    assert plan.rotation_count() <= 32
    assert len(plan.galois_steps) <= 16
    assert plan.estimates["expected_max_logit_error"] > 0


def test_consecutive_linear_layers_merge_into_one_level() -> None:
    rng = np.random.default_rng(0)
    artifact = make_artifact(
        [
            Linear(rng.normal(size=(6, 5)), rng.normal(size=6)),
            Linear(rng.normal(size=(4, 6)), rng.normal(size=4)),
            Poly((0.0, 0.0, 1.0)),
            Linear(rng.normal(size=(3, 4)), rng.normal(size=3)),
        ],
        (5,),
    )
    plan = compile_plan(artifact)
    assert [type(s) for s in plan.steps] == [LinearStep, PolyApply, LinearStep]


def test_polynomials_above_degree_four_are_refused_with_the_layer() -> None:
    artifact = make_artifact(
        [
            Linear(np.eye(3), np.zeros(3)),
            Poly((0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
            Linear(np.eye(3), np.zeros(3)),
        ],
        (3,),
    )
    with pytest.raises(CompileError, match=r"layers\[1\].*degree 5"):
        compile_plan(artifact)


def test_too_deep_is_refused_with_the_maximum() -> None:
    layers = []
    for _ in range(40):
        layers += [Linear(np.eye(3), np.zeros(3)), Poly((0.0, 0.0, 1.0))]
    artifact = make_artifact([*layers, Linear(np.eye(3), np.zeros(3))], (3,))
    with pytest.raises(ParameterError, match="40 levels.*at most"):
        compile_plan(artifact)


def test_conv_after_conv_compiles() -> None:
    rng = np.random.default_rng(3)
    artifact = make_artifact(
        [
            Conv2d(rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2), (1, 1), (1, 1)),
            Poly((0.0, 0.0, 1.0)),
            Conv2d(rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3), (2, 2), (0, 0)),
            Flatten(),
            Linear(rng.normal(size=(4, 27)), rng.normal(size=4)),
        ],
        (1, 8, 8),
    )
    x = rng.normal(size=(1, 8, 8))
    _check(artifact, x, compile_plan(artifact))


def test_zero_weight_blocks_never_reach_seal() -> None:
    """A layer whose weights vanish on whole blocks compiles to plaintexts that are non-zero."""
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(64, 256)) / 16
    weight[:, 64:192] = 0.0  # whole diagonals of the map are zero
    artifact = make_artifact(
        [
            Linear(rng.normal(size=(256, 20)) / 4, np.zeros(256)),
            Poly((0.0, 0.2, 0.1)),
            Linear(weight, np.zeros(64)),
            Poly((0.0, 0.2, 0.1)),
            Linear(rng.normal(size=(3, 64)) / 8, np.zeros(3)),
        ],
        (20,),
    )
    plan = compile_plan(artifact)
    for step in plan.linear_steps():
        for term in step.terms:
            product = term.product
            plains = (
                product.plaintexts()
                if hasattr(product, "plaintexts") and callable(product.plaintexts)
                else product.plaintexts
            )
            assert all(np.any(p) for p in plains)
    _check(artifact, rng.normal(size=20), plan)
