"""The batch plan over HTTP: one sample per slot, no Galois keys, limits in samples."""

from __future__ import annotations

import numpy as np
import pytest

from clients import BadRequestError, HEClient, KeySet, ModelSession, PayloadTooLargeError
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import BatchDecoding, BatchEncoding, decode_key_bundle, preprocess


@pytest.fixture(scope="module")
def breast(client: HEClient) -> ModelSession:
    return client.model("breast-cancer-mlp", plan="batch")


def test_card_offers_both_plans_and_batch_needs_no_galois_keys(client: HEClient) -> None:
    card = client.card("mnist-cnn")
    assert set(card.plans) == {"latency", "batch"}
    batch = card.plan("batch")
    assert batch.galois_steps == ()
    assert batch.input_encoding == BatchEncoding(features=784, slot_count=4096)
    assert batch.output_decoding == BatchDecoding(outputs=10)
    assert batch.details["rotations"] == 0
    keys = KeySet.generate(batch.ckks, batch.galois_steps)
    assert set(decode_key_bundle(keys.public_context).sections) == {"relin_keys"}
    assert len(keys.public_context) <= 2 << 20  # the bound for the batch plan


def test_batch_predictions_match_the_plain_network(breast: ModelSession) -> None:
    artifact = load_artifact(DEFAULT_MODELS_DIR / "breast-cancer-mlp")
    from models.datasets import load_breast_cancer_split

    raw = load_breast_cancer_split(0).x_test[:37]  # an odd count: one partly filled group
    logits = breast.predict_many(raw)
    plain = np.stack(
        [forward_plain(artifact, preprocess(x, artifact.preprocessing, (30,))) for x in raw]
    )
    assert logits.shape == (37, 2)
    np.testing.assert_allclose(logits, plain, atol=1e-2)
    assert np.array_equal(logits.argmax(axis=1), plain.argmax(axis=1))
    assert breast.last_timings["server_affine"] > 0


def test_batch_with_the_wrong_ciphertext_count_gets_400(
    client: HEClient, breast: ModelSession
) -> None:
    one = breast.keys.encrypt(np.zeros(4096))
    with pytest.raises(BadRequestError, match="takes 30 ciphertexts per group of samples"):
        client.predict_raw("breast-cancer-mlp", breast.context_id, [one] * 29, plan="batch")


def test_latency_keys_do_not_serve_the_batch_plan(client: HEClient, breast: ModelSession) -> None:
    from clients import ParameterMismatchError

    latency = client.model("breast-cancer-mlp")
    with pytest.raises(ParameterMismatchError, match="batch plan"):
        client.predict_raw(
            "breast-cancer-mlp",
            latency.context_id,
            [breast.keys.encrypt(np.zeros(4096))] * 30,
            plan="batch",
        )


def test_a_batch_over_the_limit_gets_413_with_the_limit() -> None:
    from he_service import create_app

    small = create_app({"max_batch_samples": 4096})
    import httpx

    with HEClient("http://testserver", transport=httpx.WSGITransport(app=small)) as client:
        session = client.model("breast-cancer-mlp", plan="batch")
        one = session.keys.encrypt(np.zeros(4096))
        with pytest.raises(PayloadTooLargeError, match="limit of 4096 samples"):
            client.predict_raw("breast-cancer-mlp", session.context_id, [one] * 60, plan="batch")
