"""Encrypted predictions agree with the plaintext polynomial network on held-out digits."""

from __future__ import annotations

import os

import numpy as np
import pytest

from clients import HEClient, ModelSession
from he_service.artifacts import ModelArtifact
from he_service.engine import forward_plain
from he_service.protocol import preprocess

# 100 images keep the suite fast; HE_AGREEMENT_SAMPLES=1000 checks the whole held-out split.
SAMPLES = int(os.environ.get("HE_AGREEMENT_SAMPLES", "100"))


@pytest.mark.parametrize("plan", ["latency", "batch"])
def test_encrypted_argmax_agrees_with_plaintext_on_held_out_images(
    plan: str,
    session: ModelSession,
    client: HEClient,
    mnist_artifact: ModelArtifact,
    mnist_test_images: tuple[np.ndarray, np.ndarray],
    record_property: pytest.RecordProperty,
) -> None:
    images = mnist_test_images[0][:SAMPLES]
    model = session if plan == "latency" else client.model("mnist-cnn", plan="batch")
    encrypted = model.predict_many(images)
    plain = np.stack(
        [
            forward_plain(mnist_artifact, preprocess(x, mnist_artifact.preprocessing, (1, 28, 28)))
            for x in images
        ]
    )
    agreement = float(np.mean(encrypted.argmax(axis=1) == plain.argmax(axis=1)))
    max_error = float(np.abs(encrypted - plain).max())
    record_property("agreement", agreement)
    record_property("max_abs_logit_error", max_error)
    print(
        f"\n{plan}: agreement {agreement:.4f} on {len(images)} images, "
        f"max |logit error| {max_error:.2e}"
    )
    assert agreement >= 0.995
    # Released outputs are rounded to the plan's published precision: within two of its steps
    # (the engine's raw error, about 0.03, is checked by the engine's tests).
    assert max_error <= 2 * model.spec.output_precision
