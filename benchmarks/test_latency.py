"""One-sample latency of every stage: encrypt, upload, evaluate, round trip, decrypt.

Sizes in bytes go to each benchmark's ``extra_info`` (see ``--benchmark-json``), so speed and
size are reported together. Run: ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tenseal.sealapi as seal
from flask import Flask

from clients import ModelSession
from he_service.config import DEFAULT_MODELS_DIR
from he_service.protocol import load_seal, save_seal

MODELS = sorted(p.name for p in DEFAULT_MODELS_DIR.iterdir() if (p / "manifest.json").is_file())


def _sample(session: ModelSession) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, size=session.card.input_shape)


@pytest.mark.parametrize("model", MODELS)
def test_client_encrypt(benchmark, session_for: Callable[[str], ModelSession], model: str) -> None:  # type: ignore[no-untyped-def]
    session = session_for(model)
    x = _sample(session)
    ciphertext = benchmark(session.encrypt, x)
    benchmark.extra_info["input_ciphertext_bytes"] = len(ciphertext)


@pytest.mark.parametrize("model", MODELS)
def test_upload_public_context(benchmark, session_for, client, model: str) -> None:  # type: ignore[no-untyped-def]
    """POST the public context over loopback (the server hashes it and finds it stored)."""
    session = session_for(model)
    context = session.public_context()
    benchmark.pedantic(client.upload_context, args=(context,), rounds=5, iterations=1)
    benchmark.extra_info["public_context_bytes"] = len(context)


@pytest.mark.parametrize("model", MODELS)
def test_server_evaluation(benchmark, session_for, app: Flask, model: str) -> None:  # type: ignore[no-untyped-def]
    """The homomorphic evaluation alone, as the predict route runs it."""
    session = session_for(model)
    state = app.extensions["he_service"]
    loaded = state["registry"].get(model)
    stored = state["store"].get(session.context_id)
    ct = load_seal(
        seal.Ciphertext, session.encrypt(_sample(session)), loaded.evaluator.context, what="input"
    )
    out = benchmark(loaded.evaluator.evaluate, ct, stored.relin_keys, stored.galois_keys)
    benchmark.extra_info["output_ciphertext_bytes"] = len(save_seal(out))
    benchmark.extra_info["rotations"] = loaded.plan.rotation_count()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", [1, 4])
def test_predict_round_trip(benchmark, session_for, client, model: str, batch: int) -> None:  # type: ignore[no-untyped-def]
    """Upload ciphertexts, evaluate, download results: one HTTP request over loopback."""
    session = session_for(model)
    ciphertexts = [session.encrypt(_sample(session))] * batch
    outputs, server = benchmark(client.predict_raw, model, session.context_id, ciphertexts)
    benchmark.extra_info["request_bytes"] = sum(map(len, ciphertexts))
    benchmark.extra_info["response_bytes"] = sum(map(len, outputs))
    benchmark.extra_info["server_timing_seconds"] = server


@pytest.mark.parametrize("model", MODELS)
def test_client_decrypt(benchmark, session_for, client, model: str) -> None:  # type: ignore[no-untyped-def]
    session = session_for(model)
    (output,), _ = client.predict_raw(
        model, session.context_id, [session.encrypt(_sample(session))]
    )
    logits = benchmark(session.decrypt, output)
    assert logits.shape == (len(session.card.labels),)
    benchmark.extra_info["output_ciphertext_bytes"] = len(output)
