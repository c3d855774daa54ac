"""Safe decryption: every public SDK call releases outputs on the card's precision grid, never
raw decryptions; outputs outside the calibrated ranges are flagged."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest

import clients
from clients import HEClient, KeySet, ModelSession, OutOfRangeWarning, Outputs
from clients._release import noise_spread
from clients.cli import _print_prediction
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import ModelCard, ProtocolError, output_step, preprocess

BREAST = "breast-cancer-mlp"


@pytest.fixture(scope="module")
def breast_data() -> tuple[np.ndarray, np.ndarray]:
    """Raw breast-cancer samples and the plaintext polynomial network's outputs on them."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer().data[:12]
    artifact = load_artifact(DEFAULT_MODELS_DIR / BREAST)
    prepared = [preprocess(x, artifact.preprocessing, artifact.input_shape) for x in raw]
    return raw, np.stack([forward_plain(artifact, x) for x in prepared])


@pytest.fixture(scope="module", params=["latency", "batch"])
def breast_session(request: pytest.FixtureRequest, client: HEClient) -> ModelSession:
    return client.model(BREAST, plan=request.param)


def _assert_released(values: np.ndarray, plain: np.ndarray, step: float) -> None:
    """On the grid of the published precision, and within two steps of the plaintext network."""
    values = np.asarray(values)
    assert step == output_step(step)  # a power of two: multiples of it are exact floats
    np.testing.assert_array_equal(values / step, np.round(values / step))
    assert np.abs(values - plain).max() <= 2 * step


def test_every_public_call_returns_values_at_the_published_precision(
    breast_session: ModelSession, breast_data: tuple[np.ndarray, np.ndarray]
) -> None:
    raw, plain = breast_data
    session = breast_session
    step = session.spec.output_precision
    many = session.predict_many(raw)
    assert isinstance(many, Outputs) and many.shape == plain.shape
    _assert_released(many, plain, step)
    _assert_released(session.predict(raw[0]), plain[0], step)
    label = session.classify(raw[1])
    margin = abs(plain[1][0] - plain[1][1])
    assert margin > 4 * step and label == session.card.labels[int(np.argmax(plain[1]))]
    if session.plan.value == "latency":
        outputs, _ = session.client.predict_raw(
            BREAST, session.context_id, session.encrypt(raw[2]), plan=session.plan
        )
        _assert_released(session.decrypt(outputs[0]), plain[2], step)


def test_mnist_latency_outputs_are_on_its_grid(
    session: ModelSession, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = mnist_test_images
    artifact = load_artifact(DEFAULT_MODELS_DIR / "mnist-cnn")
    plain = forward_plain(artifact, preprocess(images[0], artifact.preprocessing, (1, 28, 28)))
    _assert_released(session.predict(images[0]), plain, session.spec.output_precision)


def test_no_public_name_exposes_the_raw_decryption(session: ModelSession) -> None:
    """The only public ``decrypt`` is the session's, and it releases like ``predict``."""
    found = {
        f"{name}.{attr}"
        for name in clients.__all__
        for attr, _ in inspect.getmembers(getattr(clients, name))
        if not attr.startswith("_") and "decrypt" in attr.lower()
    }
    assert found == {"ModelSession.decrypt"}
    assert not hasattr(KeySet, "decrypt")
    # Raw slots carry digits far below the precision; what the session returns does not.
    ciphertext = session.keys.encrypt(np.full(session.spec.ckks.slot_count, 0.3))
    raw = session.keys._decrypt_slots(ciphertext).real[:10]
    step = session.spec.output_precision
    assert not np.array_equal(raw / step, np.round(raw / step))
    released = session.decrypt(ciphertext)
    np.testing.assert_array_equal(released / step, np.round(released / step))


def test_far_inputs_are_flagged_with_the_warning_and_the_field(
    breast_session: ModelSession, breast_data: tuple[np.ndarray, np.ndarray]
) -> None:
    raw, _ = breast_data
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfRangeWarning)  # in-range inputs: no warning
        normal = breast_session.predict_many(raw)
    assert not normal.out_of_range.any()
    mixed = np.concatenate([raw[:2], 100 * raw[2:4]])  # scaled far outside the data
    with pytest.warns(OutOfRangeWarning, match="of 4 samples have outputs outside") as caught:
        outputs = breast_session.predict_many(mixed)
    if breast_session.plan.value == "latency":
        assert outputs.out_of_range.tolist() == [False, False, True, True]
        assert "2 of 4 samples" in str(caught[0].message)
    else:
        # One sample per slot: the far samples' values overflow the ciphertext's modulus,
        # which corrupts every slot of the group, so all four are garbage and flagged.
        assert outputs.out_of_range.tolist() == [True] * 4
    # The field follows rows through indexing and stays usable as an array.
    flags = outputs.out_of_range.tolist()
    assert outputs[3].out_of_range is True and outputs[0].out_of_range is flags[0]
    assert outputs[1:].out_of_range.tolist() == flags[1:]
    assert outputs[[3, 0]].out_of_range.tolist() == [True, flags[0]]
    assert np.asarray(outputs).shape == (4, 2) and outputs.argmax(axis=1).shape == (4,)
    assert type(outputs[:, 0]) is np.ndarray
    with pytest.warns(OutOfRangeWarning, match="1 of 1 samples"):
        one = breast_session.predict(100 * raw[0])
    assert one.out_of_range is True


def test_outputs_refuse_to_flag_what_is_not_rows_of_outputs() -> None:
    outputs = Outputs(np.array([[0.0, 5.0], [1.0, 1.0], [3.0, -9.0]]), ((-1.0, 2.0), (-2.0, 2.0)))
    assert outputs.out_of_range.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="does not hold samples' outputs"):
        _ = outputs.argmax(axis=1).out_of_range
    assert Outputs(np.ones((2, 2)), None).out_of_range.tolist() == [False, False]


def test_card_round_trip_carries_precision_and_ranges(client: HEClient) -> None:
    card = client.card(BREAST)
    manifest = load_artifact(DEFAULT_MODELS_DIR / BREAST).manifest
    recorded = manifest["conversion"]["output_bound"]["output_ranges"]
    assert card.output_ranges == tuple(tuple(pair) for pair in recorded)
    for plan in card.plans.values():
        error = plan.costs.expected_max_logit_error
        assert error is not None and error <= plan.output_precision < 2 * error
    doc = card.to_json()
    assert ModelCard.from_json(doc) == card
    assert (
        ModelCard.from_json({**doc, "output": {**doc["output"], "ranges": None}}).output_ranges
        is None
    )
    for ranges in ([[1.0, 0.0], [0.0, 1.0]], [[0, 10**400], [0.0, 1.0]], [[0.0, 1.0]]):
        bad = {**doc, "output": {**doc["output"], "ranges": ranges}}
        with pytest.raises(ProtocolError, match="card.output.ranges must"):
            ModelCard.from_json(bad)
    plan = dict(doc["plans"]["batch"])
    with pytest.raises(ProtocolError, match="output_precision must be a finite number"):
        ModelCard.from_json(
            {**doc, "plans": {**doc["plans"], "batch": {**plan, "output_precision": 10**400}}}
        )
    plan = dict(doc["plans"]["batch"])
    del plan["output_precision"]
    with pytest.raises(ProtocolError, match="output_precision"):
        ModelCard.from_json({**doc, "plans": {**doc["plans"], "batch": plan}})
    with pytest.raises(ProtocolError, match="upgrade the client"):
        ModelCard.from_json({**doc, "card_version": 2})


def test_cli_prints_the_precision_and_flags_unreliable_outputs(
    breast_session: ModelSession, capsys: pytest.CaptureFixture[str]
) -> None:
    ranges = breast_session.card.output_ranges
    assert ranges is not None
    far = Outputs(np.array([ranges[0][1] + 1.0, 0.0]), ranges)
    _print_prediction(breast_session, Path("x.npy"), far)
    out = capsys.readouterr().out
    assert f"output precision: {breast_session.spec.output_precision:g}" in out
    assert "UNRELIABLE" in out
    _print_prediction(breast_session, Path("x.npy"), Outputs(np.zeros(2), ranges))
    assert "UNRELIABLE" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bound", "step"), [(0.194, 0.25), (0.25, 0.25), (2.73, 4.0), (3e-3, 2**-8)]
)
def test_output_step_is_the_next_power_of_two(bound: float, step: float) -> None:
    assert output_step(bound) == step


def test_noise_spread_measures_the_imaginary_noise_and_ignores_outlying_slots() -> None:
    rng = np.random.default_rng(0)
    slots = rng.normal(5.0, 1.0, 4096) + 1j * rng.normal(0.0, 0.01, 4096)
    slots[:20] += 1j * 1e3  # a few slots far out, as a far sample of a batch group
    assert noise_spread(slots) == pytest.approx(0.01, rel=0.1)
