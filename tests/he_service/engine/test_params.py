import pytest

from he_service.engine import CubicStep, ParameterError, QuarticStep, SquareStep, choose_params
from he_service.protocol import seal_context
from he_service.protocol.params import MAX_COEFF_BITS_128


@pytest.mark.parametrize(
    ("activations", "slots", "degree"),
    [
        ([], 100, 4096),
        ([SquareStep()], 2048, 8192),
        ([SquareStep()] * 2, 4096, 8192),
        ([SquareStep()] * 2, 4097, 16384),
        ([CubicStep(1.0, 2.0, 0.5), QuarticStep(1.0, 2.0)], 10, 16384),
        ([SquareStep()] * 9, 10, 32768),
    ],
)
def test_smallest_ring_that_holds_the_plan(activations: list, slots: int, degree: int) -> None:
    chain = choose_params(activations, slots)
    params = chain.params
    assert params.poly_modulus_degree == degree
    assert params.depth == sum(a.primes for a in activations)  # one prime per level
    assert sum(params.coeff_modulus_bits) <= MAX_COEFF_BITS_128[degree]
    assert max(params.coeff_modulus_bits) <= 60
    # Key switching stays quiet only if the special prime is close to the largest data prime.
    assert params.coeff_modulus_bits[-1] >= max(params.coeff_modulus_bits[:-1]) - 10
    assert str(degree) in chain.reason["reason"]
    assert seal_context(params).parameters_set()  # SEAL itself accepts it at 128-bit


def test_too_deep_is_refused_with_the_maximum() -> None:
    with pytest.raises(ParameterError, match="40 activations.*at most"):
        choose_params([SquareStep()] * 40, 10)
