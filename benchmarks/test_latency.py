"""Latency plan (one sample per request): every stage, then the whole client call.

Per model: client encryption, public-context upload, server evaluation, the HTTP round trip
through waitress on loopback (1 and 4 samples per request), client decryption, and
``session.predict`` end to end (encrypt -> POST -> evaluate -> decrypt; keys uploaded once
before). Sizes in bytes, operation counts and the max abs logit error against
``forward_plain`` on held-out samples go to each benchmark's ``extra_info``
(``--benchmark-json``); ``python benchmarks/report.py`` prints them as one table.

Targets (same-run ratios against ``test_baseline_tenseal.py``, mnist-cnn): server evaluation
at least 30x faster than TenSEAL's tutorial pipeline, the end-to-end call at least 10x.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
from harness import BASELINE_MODEL, BASELINE_PLAN, HeldOut, Measurements, Served, Sessions
from pytest_benchmark.fixture import BenchmarkFixture

from clients import HEClient
from he_service.engine import Timings
from he_service.protocol import encode_frames, load_seal, save_seal
from he_service.serving import ServedPlan

PLAN = "latency"
ERROR_SAMPLES = 4  # held-out samples whose logits are compared with forward_plain
SERVER_SPEEDUP = 30.0  # latency server evaluation vs the tutorial pipeline, mnist-cnn
END_TO_END_SPEEDUP = 10.0  # session.predict vs the tutorial's server evaluation alone


def _load(plan: ServedPlan, data: list[bytes]) -> list[seal.Ciphertext]:
    return [load_seal(seal.Ciphertext, b, plan.context, what="input") for b in data]


def test_client_encrypt(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    heldout: HeldOut,
    measurements: Measurements,
    model: str,
) -> None:
    session = sessions.get(model, PLAN)
    ciphertexts = benchmark(session.encrypt, heldout.raw(model)[0])
    measurements.record(
        benchmark,
        model=model,
        plan=PLAN,
        stage="encrypt",
        input_ciphertexts=len(ciphertexts),
        input_ciphertext_bytes=sum(map(len, ciphertexts)),
    )


def test_upload_public_context(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    client: HEClient,
    measurements: Measurements,
    model: str,
) -> None:
    """POST the public context over loopback (the server hashes it and finds it stored)."""
    session = sessions.get(model, PLAN)
    context = session.public_context()
    benchmark.pedantic(client.upload_context, args=(context,), rounds=5, iterations=1)
    measurements.record(
        benchmark,
        model=model,
        plan=PLAN,
        stage="upload",
        public_context_bytes=len(context),
        galois_keys=len(session.spec.galois_steps),
    )


def test_server_evaluation(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    served: Served,
    heldout: HeldOut,
    measurements: Measurements,
    model: str,
) -> None:
    """The homomorphic evaluation of one sample alone, as the predict route runs it."""
    session = sessions.get(model, PLAN)
    plan = served.plan(model, PLAN)
    keys = served.keys(session.context_id)
    raw = heldout.raw(model)[:ERROR_SAMPLES]
    encrypted = [session.encrypt(x) for x in raw]
    inputs = [_load(plan, data) for data in encrypted]
    for unit in inputs:
        plan.check(unit)
    timed = benchmark(plan.evaluate, inputs[0], keys.relin_keys, keys.galois_keys, Timings())
    outputs = [timed] + [
        plan.evaluate(unit, keys.relin_keys, keys.galois_keys, Timings()) for unit in inputs[1:]
    ]
    answers = [[save_seal(ct) for ct in out] for out in outputs]
    logits = np.stack([session.decrypt(answer[0]) for answer in answers])
    error = float(np.abs(logits - heldout.expected(model, raw)).max())
    details = session.spec.details
    measurements.record(
        benchmark,
        model=model,
        plan=PLAN,
        stage="server",
        public_context_bytes=len(session.public_context()),
        request_bytes=len(encode_frames(encrypted[0])),
        response_bytes=len(encode_frames(answers[0])),
        input_ciphertexts=len(encrypted[0]),
        input_ciphertext_bytes=sum(map(len, encrypted[0])),
        rotations=details.get("rotations"),
        relinearizations=details.get("relinearizations"),
        galois_keys=len(session.spec.galois_steps),
        poly_modulus_degree=session.spec.ckks.poly_modulus_degree,
        coeff_modulus_bits=list(session.spec.ckks.coeff_modulus_bits),
        max_abs_logit_error=error,
        error_samples=len(raw),
    )
    if model == BASELINE_MODEL:
        measurements.target(
            benchmark,
            "latency server evaluation vs TenSEAL tutorial (mnist-cnn)",
            reference=(BASELINE_MODEL, BASELINE_PLAN, "server"),
            subject=(model, PLAN, "server"),
            at_least=SERVER_SPEEDUP,
        )


@pytest.mark.parametrize("samples", [1, 4])
def test_predict_round_trip(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    client: HEClient,
    heldout: HeldOut,
    measurements: Measurements,
    model: str,
    samples: int,
) -> None:
    """Upload ciphertexts, evaluate, download results: one HTTP request over loopback."""
    session = sessions.get(model, PLAN)
    ciphertexts = [ct for x in heldout.raw(model)[:samples] for ct in session.encrypt(x)]
    outputs, server = benchmark(
        client.predict_raw, model, session.context_id, ciphertexts, plan=PLAN
    )
    assert len(outputs) == samples
    measurements.record(
        benchmark,
        model=model,
        plan=PLAN,
        stage=f"round_trip_{samples}",
        samples=samples,
        request_bytes=len(encode_frames(ciphertexts)),
        response_bytes=len(encode_frames(outputs)),
        server_timing_seconds=server,
    )


def test_client_decrypt(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    client: HEClient,
    heldout: HeldOut,
    measurements: Measurements,
    model: str,
) -> None:
    session = sessions.get(model, PLAN)
    ciphertexts = session.encrypt(heldout.raw(model)[0])
    (output,), _ = client.predict_raw(model, session.context_id, ciphertexts, plan=PLAN)
    logits = benchmark(session.decrypt, output)
    assert logits.shape == (len(session.card.labels),)
    measurements.record(
        benchmark, model=model, plan=PLAN, stage="decrypt", output_ciphertext_bytes=len(output)
    )


def test_end_to_end(
    benchmark: BenchmarkFixture,
    sessions: Sessions,
    heldout: HeldOut,
    measurements: Measurements,
    model: str,
) -> None:
    """``session.predict`` of one held-out sample: encrypt, HTTP over loopback, decrypt."""
    session = sessions.get(model, PLAN)
    raw = heldout.raw(model)[:1]
    logits = benchmark(session.predict, raw[0])
    expected = heldout.expected(model, raw)[0]
    assert int(np.argmax(logits)) == int(np.argmax(expected))
    measurements.record(
        benchmark,
        model=model,
        plan=PLAN,
        stage="e2e",
        client_stage_seconds=dict(session.last_timings),
        max_abs_logit_error=float(np.abs(logits - expected).max()),
    )
    if model == BASELINE_MODEL:
        measurements.target(
            benchmark,
            "latency end to end vs TenSEAL tutorial server evaluation (mnist-cnn)",
            reference=(BASELINE_MODEL, BASELINE_PLAN, "server"),
            subject=(model, PLAN, "e2e"),
            at_least=END_TO_END_SPEEDUP,
        )
