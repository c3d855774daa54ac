"""The batch layout: samples to per-feature slot vectors and back."""

from __future__ import annotations

import numpy as np
import pytest

from he_service.protocol.batch_encoding import decode_batch, encode_batch
from he_service.protocol.errors import ProtocolError


@pytest.mark.parametrize("count", [1, 7, 8, 9, 20])
def test_round_trip_pads_the_last_group(count: int) -> None:
    rng = np.random.default_rng(count)
    samples = rng.normal(size=(count, 2, 3, 3))
    groups = encode_batch(samples, 8)
    assert len(groups) == -(-count // 8)
    assert all(g.shape == (18, 8) and g.dtype == np.float64 for g in groups)
    # sample j of a group sits in slot j of every feature row
    np.testing.assert_array_equal(groups[0][:, 0], samples[0].reshape(-1))
    padding = len(groups) * 8 - count
    if padding:
        assert not np.any(groups[-1][:, 8 - padding :])
    # a model that returns, say, the sum and the first feature of each sample
    outputs = [np.stack([g.sum(axis=0), g[0]]) for g in groups]
    decoded = decode_batch(outputs, count)
    flat = samples.reshape(count, -1)
    np.testing.assert_allclose(decoded, np.stack([flat.sum(axis=1), flat[:, 0]], axis=1))


def test_integer_samples_and_a_one_dimensional_model() -> None:
    samples = np.arange(12, dtype=np.int64).reshape(4, 3)
    (group,) = encode_batch(samples, 4)
    np.testing.assert_array_equal(group, samples.T.astype(float))
    np.testing.assert_array_equal(decode_batch([group], 4), samples.astype(float))


@pytest.mark.parametrize(
    ("samples", "slot_count", "message"),
    [
        (np.zeros(5), 8, "count, \\*input_shape"),
        (np.zeros((0, 3)), 8, "count >= 1"),
        (np.zeros((2, 3)), 6, "power of two"),
        (np.zeros((2, 3)), 0, "power of two"),
        (np.zeros((2, 3)), True, "power of two"),
        (np.array([[1.0, np.nan]]), 8, "NaN"),
        (np.array([[1.0, np.inf]]), 8, "NaN or infinity"),
        (np.array([["a", "b"]]), 8, "real numbers"),
        (np.array([[1j, 2]]), 8, "real numbers"),
    ],
)
def test_encode_refuses_bad_input(samples: np.ndarray, slot_count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        encode_batch(samples, slot_count)


@pytest.mark.parametrize(
    ("outputs", "count", "message"),
    [
        ([], 1, "non-empty list"),
        (np.zeros((2, 8)), 1, "non-empty list"),
        ([np.zeros(8)], 1, "n_outputs, slot_count"),
        ([np.zeros((2, 8)), np.zeros((3, 8))], 9, "group 1 has shape"),
        ([np.zeros((2, 8))], 9, "make 2 group"),
        ([np.zeros((2, 8)), np.zeros((2, 8))], 8, "make 1 group"),
        ([np.zeros((2, 8))], 0, "positive integer"),
        ([np.zeros((2, 8))], 1.5, "positive integer"),
        ([np.full((2, 8), np.nan)], 3, "NaN"),
        ([np.zeros((2, 8), dtype=complex)], 3, "real numbers"),
    ],
)
def test_decode_refuses_bad_input(outputs: list[np.ndarray], count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_batch(outputs, count)


def test_padding_slots_may_hold_anything() -> None:
    group = np.zeros((1, 4))
    group[0, 2:] = np.nan  # only slots [0, count) are read
    np.testing.assert_array_equal(decode_batch([group], 2), np.zeros((2, 1)))
