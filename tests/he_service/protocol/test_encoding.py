import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from he_service.artifacts import Conv2d
from he_service.engine.reference import _im2col as im2col
from he_service.engine.reference import conv2d
from he_service.protocol import (
    ProtocolError,
    decode_output,
    encode_input,
    preprocess,
    preprocess_rows,
)


def test_im2col_matches_a_direct_convolution() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 7))
    layer = Conv2d(rng.normal(size=(3, 2, 3, 2)), rng.normal(size=3), (2, 1), (1, 0))
    direct = np.zeros((3, 5, 6))
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    for c in range(3):
        for i in range(5):
            for j in range(6):
                patch = padded[:, 2 * i : 2 * i + 3, j : j + 2]
                direct[c, i, j] = np.sum(patch * layer.weight[c]) + layer.bias[c]
    np.testing.assert_allclose(conv2d(x, layer), direct)
    assert im2col(x, (3, 2), (2, 1), (1, 0)).shape == (12, 30)


def test_gather_encoding_reads_the_index_table_and_repeats_its_period() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    spec = {
        "kind": "gather",
        "length": 4,
        "slot_count": 16,
        "ciphertexts": 2,
        "period": 4,
        "index": [[0, 1, -1, 3], [2, 2, 0, -1]],
    }
    first, second = encode_input(x, spec)
    np.testing.assert_array_equal(first, np.tile([1.0, 2.0, 0.0, 4.0], 4))
    np.testing.assert_array_equal(second, np.tile([3.0, 3.0, 1.0, 0.0], 4))
    with pytest.raises(ProtocolError, match="expects 4"):
        encode_input(np.zeros(3), spec)
    with pytest.raises(ProtocolError, match="index"):
        encode_input(x, {**spec, "period": 8})


def test_output_decoding_reads_the_prefix() -> None:
    np.testing.assert_array_equal(
        decode_output(np.arange(8.0), {"kind": "prefix", "length": 3, "period": 4}),
        [0.0, 1.0, 2.0],
    )


def test_preprocess_scales_and_standardises_per_channel() -> None:
    x = np.full((2, 2, 2), 255.0)
    out = preprocess(x, {"scale": 1 / 255, "mean": [0.5, 0.0], "std": [0.5, 2.0]}, (2, 2, 2))
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 0.5)


@pytest.mark.parametrize("bad", [np.zeros(5), np.full(4, np.nan)])
def test_preprocess_refuses_wrong_size_and_non_finite(bad: np.ndarray) -> None:
    with pytest.raises(ProtocolError):
        preprocess(bad, {}, (4,))


def test_unknown_encodings_are_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown input encoding"):
        encode_input(np.zeros(2), {"kind": "nope", "slot_count": 4})
    with pytest.raises(ProtocolError, match="unknown output decoding"):
        decode_output(np.zeros(2), {"kind": "nope"})


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_preprocessing_rows_at_once_equals_row_by_row(rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for shape, channels in (((1, 4, 4), 1), ((3, 2, 2), 3), ((5,), 5)):
        spec = {
            "scale": float(rng.uniform(0.001, 2)),
            "mean": rng.normal(size=channels).tolist(),
            "std": rng.uniform(0.1, 3, size=channels).tolist(),
        }
        raw = rng.uniform(-300, 300, size=(rows, int(np.prod(shape))))
        one_by_one = np.stack([preprocess(x, spec, shape) for x in raw])
        np.testing.assert_array_equal(preprocess_rows(raw, spec, shape), one_by_one)
    with pytest.raises(ProtocolError, match="expects shape"):
        preprocess_rows(np.zeros((2, 7)), {}, (5,))
    with pytest.raises(ProtocolError, match="NaN"):
        preprocess_rows(np.full((2, 5), np.nan), {}, (5,))
