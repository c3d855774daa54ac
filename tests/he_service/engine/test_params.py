import pytest

from he_service.engine import ParameterError, choose_params
from he_service.protocol import seal_context
from he_service.protocol.params import MAX_COEFF_BITS_128


@pytest.mark.parametrize(
    ("depth", "slots", "degree"),
    [
        (1, 100, 4096),
        (1, 2048, 4096),
        (2, 100, 8192),
        (5, 3136, 8192),
        (5, 4097, 16384),
        (12, 10, 16384),
    ],
)
def test_smallest_ring_that_holds_the_depth(depth: int, slots: int, degree: int) -> None:
    params, why = choose_params(depth, slots)
    assert params.poly_modulus_degree == degree
    assert params.depth == depth
    assert sum(params.coeff_modulus_bits) <= MAX_COEFF_BITS_128[degree]
    assert str(degree) in why["reason"]
    assert seal_context(params).parameters_set()  # SEAL itself accepts it at 128-bit


def test_too_deep_is_refused_with_the_maximum() -> None:
    with pytest.raises(ParameterError, match="depth 40.*at most depth"):
        choose_params(40, 10)
