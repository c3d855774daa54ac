import numpy as np
import pytest

from he_service.artifacts import Conv2d, Flatten, Linear, Poly
from he_service.engine import (
    AffineStep,
    CompileError,
    InputStep,
    SquareStep,
    compile_plan,
    forward_plain,
)
from he_service.protocol import decode_output, encode_input

from .networks import make_artifact, random_network, response_deviation


@pytest.mark.parametrize("seed", range(40))
def test_random_networks_compile_to_plans_that_match_the_plain_network(seed: int) -> None:
    artifact, x = random_network(np.random.default_rng(seed))
    plan = compile_plan(artifact)
    slots = plan.simulate(encode_input(x, plan.input_encoding))
    expected = forward_plain(artifact, x)
    np.testing.assert_allclose(decode_output(slots, plan.output_decoding), expected, atol=1e-9)
    # The response must carry the outputs and nothing else (no partial sums of weights).
    assert response_deviation(slots, expected, plan.output_decoding) < 1e-9


def test_mnist_plan_shape(mnist_artifact) -> None:  # type: ignore[no-untyped-def]
    plan = compile_plan(mnist_artifact)
    kinds = [type(s) for s in plan.steps]
    assert kinds == [InputStep, SquareStep, AffineStep, SquareStep, AffineStep]
    assert plan.params.poly_modulus_degree == 8192
    # Lazy rescaling: one prime per square plus the output prime, and the special prime.
    assert len(plan.params.coeff_modulus_bits) == 4
    assert sum(plan.params.coeff_modulus_bits) <= 218
    assert plan.input_ciphertexts == 4
    # The tutorial's mm alone costs 256 + 64 rotations; the previous engine took 44.
    assert plan.rotation_count() <= 28


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
    assert [type(s) for s in compile_plan(artifact).steps] == [InputStep, SquareStep, AffineStep]


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


def test_an_activation_first_is_refused() -> None:
    artifact = make_artifact([Poly((0.0, 0.0, 1.0)), Linear(np.eye(2), np.zeros(2))], (2,))
    with pytest.raises(CompileError, match="must follow"):
        compile_plan(artifact)


def test_conv_after_conv_compiles_as_a_sparse_map() -> None:
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
    plan = compile_plan(artifact)
    got = decode_output(plan.simulate(encode_input(x, plan.input_encoding)), plan.output_decoding)
    np.testing.assert_allclose(got, forward_plain(artifact, x), atol=1e-9)


def test_negligible_leading_coefficients_lower_the_degree() -> None:
    rng = np.random.default_rng(4)
    artifact = make_artifact(
        [
            Linear(rng.normal(size=(3, 3)), np.zeros(3)),
            Poly((0.1, 0.5, 0.25, 1e-19)),
            Linear(rng.normal(size=(2, 3)), np.zeros(2)),
        ],
        (3,),
    )
    plan = compile_plan(artifact)
    assert [type(s) for s in plan.steps] == [InputStep, SquareStep, AffineStep]
    x = rng.normal(size=3)
    got = decode_output(plan.simulate(encode_input(x, plan.input_encoding)), plan.output_decoding)
    np.testing.assert_allclose(got, forward_plain(artifact, x), atol=1e-9)
