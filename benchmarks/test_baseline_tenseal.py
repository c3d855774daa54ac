"""The naive baseline: TenSEAL's MNIST tutorial pipeline on mnist-cnn's own weights.

im2col conv (``conv2d_im2col`` per channel), ``pack_vectors``, square, ``mm``, square, ``mm``
with TenSEAL's high-level API, its tutorial parameters (N=8192, [31, 26 x 6, 31] bits, scale
2^26) and its Galois keys for every power of two. mnist-cnn's activations are fitted quadratics
``c2 x^2 + c1 x + c0``; they are rewritten exactly as ``c2 (x + h)^2 + const`` (h into the
previous bias, c2 and the constant into the next layer) so the pipeline stays the tutorial's.
The tutorial's last prime leaves 5 bits above the scale, so the last layer is divided by 8 on
the server and multiplied back after decryption (same operations, no overflow).

Its median is the reference of mnist-cnn's speed targets in ``test_latency.py`` (same run).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tenseal as ts
from harness import BASELINE_MODEL, BASELINE_PLAN, Measurements
from pytest_benchmark.fixture import BenchmarkFixture

from he_service.artifacts import Conv2d, Linear, Poly, load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import preprocess

OUTPUT_DIVISOR = 8.0


def _as_square(act: Poly) -> tuple[float, float, float]:
    """Return (h, c2, const) with ``c2 x^2 + c1 x + c0 = c2 (x + h)^2 + const``."""
    c0, c1, c2 = (*act.coeffs, 0.0, 0.0)[:3]
    h = c1 / (2 * c2)
    return h, c2, c0 - c2 * h * h


def _tutorial_weights() -> dict[str, Any]:
    artifact = load_artifact(DEFAULT_MODELS_DIR / "mnist-cnn")
    conv, act1, _, fc1, act2, fc2 = artifact.layers
    assert isinstance(conv, Conv2d) and isinstance(fc1, Linear) and isinstance(fc2, Linear)
    assert isinstance(act1, Poly) and isinstance(act2, Poly)
    h1, a1, k1 = _as_square(act1)
    h2, a2, k2 = _as_square(act2)
    w1, w2 = fc1.weight * a1, fc2.weight * a2
    return {
        "artifact": artifact,
        "kernels": conv.weight.reshape(conv.weight.shape[0], 7, 7),
        "conv_bias": conv.bias + h1,
        "w1": w1,
        "b1": fc1.bias + k1 * fc1.weight.sum(axis=1) + h2,
        "w2": w2 / OUTPUT_DIVISOR,
        "b2": (fc2.bias + k2 * fc2.weight.sum(axis=1)) / OUTPUT_DIVISOR,
    }


@pytest.fixture(scope="module")
def tutorial() -> dict[str, Any]:
    weights = _tutorial_weights()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31]
    )
    context.global_scale = 2**26
    context.generate_galois_keys()
    public = context.copy()
    public.make_context_public()
    weights["context"] = context
    weights["public_context_bytes"] = len(public.serialize())
    return weights


def _server(tutorial: dict[str, Any], enc_x: ts.CKKSVector, windows: int) -> ts.CKKSVector:
    channels = [
        enc_x.conv2d_im2col(kernel.tolist(), windows) + float(bias)
        for kernel, bias in zip(tutorial["kernels"], tutorial["conv_bias"], strict=True)
    ]
    enc = ts.CKKSVector.pack_vectors(channels)
    enc.square_()
    enc = enc.mm(tutorial["w1"].T.tolist()) + tutorial["b1"].tolist()
    enc.square_()
    return enc.mm(tutorial["w2"].T.tolist()) + tutorial["b2"].tolist()


def test_baseline_tenseal_tutorial_server_evaluation(
    benchmark: BenchmarkFixture, tutorial: dict[str, Any], measurements: Measurements
) -> None:
    from models.datasets import load_mnist_split

    artifact = tutorial["artifact"]
    image = preprocess(load_mnist_split(0).x_test[0], artifact.preprocessing, (1, 28, 28))
    enc_x, windows = ts.im2col_encoding(
        tutorial["context"], image.reshape(28, 28).tolist(), 7, 7, 3
    )
    out = benchmark.pedantic(_server, args=(tutorial, enc_x, windows), rounds=3, iterations=1)
    logits = np.array(out.decrypt()) * OUTPUT_DIVISOR
    expected = forward_plain(artifact, image)
    assert int(np.argmax(logits)) == int(np.argmax(expected))
    measurements.record(
        benchmark,
        model=BASELINE_MODEL,
        plan=BASELINE_PLAN,
        stage="server",
        public_context_bytes=tutorial["public_context_bytes"],
        input_ciphertext_bytes=len(enc_x.serialize()),
        output_ciphertext_bytes=len(out.serialize()),
        # What the tutorial's client sends and receives: one CKKSVector each way.
        request_bytes=len(enc_x.serialize()),
        response_bytes=len(out.serialize()),
        max_abs_logit_error=float(np.abs(logits - expected).max()),
        error_samples=1,
    )
