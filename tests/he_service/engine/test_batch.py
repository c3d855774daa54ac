"""The batch plan: plain simulation against the network, then real encryption."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tenseal.sealapi as seal

from he_service.artifacts import Conv2d, Flatten, Linear, ModelArtifact, Poly
from he_service.engine import CompileError
from he_service.engine.batch import (
    BatchAffine,
    BatchEvaluationError,
    BatchEvaluator,
    BatchPlan,
    compile_batch_plan,
    raw_access_available,
)
from he_service.engine.batch.noise import estimate_batch_noise
from he_service.engine.batch.products import tiles_for
from he_service.engine.batch.raw import raw_view
from he_service.engine.compiler import PUBLISHED
from he_service.protocol import save_seal
from he_service.protocol.params import CkksParams, new_seal_context

from .batch_keys import Keys, check_simulation, forward, run_encrypted
from .networks import make_artifact, random_network

# ---- compilation and plain simulation


@pytest.mark.parametrize("seed", range(40))
def test_simulate_matches_forward_plain(seed: int) -> None:
    rng = np.random.default_rng(seed)
    artifact, _ = random_network(rng)
    check_simulation(artifact, rng.normal(size=(7, *artifact.input_shape)))


def test_simulate_refuses_wrong_feature_count() -> None:
    artifact, _ = random_network(np.random.default_rng(0))
    plan = compile_batch_plan(artifact)
    with pytest.raises(ValueError, match="features must have shape"):
        plan.simulate(np.zeros((plan.input_length + 1, 3)))


@pytest.mark.parametrize("name", ["mnist-cnn", "digits-cnn", "breast-cancer-mlp"])
def test_shipped_models_compile_to_few_primes_without_rotations(name: str) -> None:
    from he_service.artifacts import load_artifact
    from he_service.config import DEFAULT_MODELS_DIR

    plan = compile_batch_plan(load_artifact(DEFAULT_MODELS_DIR / name))
    params = plan.params
    assert params.poly_modulus_degree == 8192
    assert len(params.coeff_modulus_bits) == 5  # 4 data primes and the special prime
    assert sum(params.coeff_modulus_bits) <= 218
    summary = plan.summary()
    assert summary["rotations"] == 0
    assert summary["samples_per_request"] == 4096
    if name == "mnist-cnn":
        assert summary["input_ciphertexts"] == 784 and summary["output_ciphertexts"] == 10
        assert summary["ciphertext_multiplications"] == 256 + 64
        assert summary["relinearizations"] == 64 + 10  # deferred past the next affine map
        assert summary["scalar_multiplications"] < 256 * 784  # the conv's zeros are skipped


def test_units_that_are_constant_or_unused_are_pruned(keys: Callable[[CkksParams], Keys]) -> None:
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(5, 6))
    w1[1] = 0.0  # hidden unit 1 is the constant bias[1]
    w2 = rng.normal(size=(4, 5))
    w2[:, 3] = 0.0  # hidden unit 3 is never read
    w2[2] = 0.0  # output 2 is a constant
    artifact = make_artifact(
        [
            Linear(w1, rng.normal(size=5)),
            Poly((0.1, 0.4, 0.3)),
            Linear(w2, rng.normal(size=4)),
        ],
        (6,),
    )
    plan = compile_batch_plan(artifact)
    first = plan.layers[0]
    assert isinstance(first, BatchAffine) and first.terms[0].weights.shape == (3, 6)
    samples = rng.normal(size=(9, 6))
    expected = forward(artifact, samples)
    tolerance = 1e-3 * np.abs(expected).max()
    np.testing.assert_allclose(plan.simulate(samples.T, quantised=True).T, expected, atol=tolerance)
    got, out = run_encrypted(plan, keys(plan.params), samples)
    np.testing.assert_allclose(got, expected, atol=tolerance)
    assert out[2].is_transparent()  # a known constant: nothing secret in it


def test_network_ignoring_its_input_is_refused() -> None:
    artifact = make_artifact([Linear(np.zeros((2, 3)), np.ones(2))], (3,))
    with pytest.raises(CompileError, match="does not depend on (its|the) input"):
        compile_batch_plan(artifact)


def test_too_deep_network_is_refused() -> None:
    layers: list = []
    for _ in range(12):
        layers += [Linear(np.eye(3) * 0.5, np.zeros(3)), Poly((0.0, 0.1, 0.2, 0.05, 0.01))]
    artifact = make_artifact([*layers, Linear(np.ones((1, 3)), np.zeros(1))], (3,))
    with pytest.raises(CompileError, match="do not fit CKKS parameters"):
        compile_batch_plan(artifact)


# ---- the exact integer products


@pytest.mark.parametrize(
    ("prime_bits", "weight_bits"), [(60, 14), (45, 20), (30, 10), (38, 26), (40, 16)]
)
def test_products_are_exact_modular_arithmetic(prime_bits: int, weight_bits: int) -> None:
    from he_service.engine.batch.products import (
        MAX_CHUNK_BITS,
        chunk_bits,
        combine_chunks,
        split_chunks,
        tile_products,
    )

    rng = np.random.default_rng(prime_bits)
    q = seal.CoeffModulus.Create(64, [prime_bits])[0].value()
    weights = rng.integers(-(2**weight_bits), 2**weight_bits + 1, size=(9, 40)).astype(float)
    weights[:6, 5:25] = 0.0  # sparse, as a convolution
    weights[3, :] = 2.0**weight_bits  # the worst row sum
    weights[7, :] = 0.0  # a constant row
    degree = 16
    coefficients = rng.integers(0, q, size=(40, 1, degree), dtype=np.uint64)
    coefficients[0] = q - 1
    bits = chunk_bits(weights)
    assert bits <= MAX_CHUNK_BITS
    count = -(-q.bit_length() // bits)
    chunks = np.empty((40, count, degree))
    for i in range(40):
        split_chunks(coefficients[i, 0], bits, count, chunks[i])
    order, tiles = tiles_for(weights)
    assert sorted(order.tolist()) == list(range(9)) and order[-1] == 7
    products = np.zeros((9, count * degree))
    tile_products(tiles, chunks.reshape(40, -1), products)
    total, spare = np.empty((9, degree), dtype=np.int64), np.empty((9, degree), dtype=np.int64)
    row_sum_bits = float(np.log2(np.abs(weights).sum(axis=1).max()))
    combine_chunks(products, q, bits, count, row_sum_bits, total, spare)
    got = np.remainder(total, q)
    exact = [
        [
            sum(int(w) * int(c) for w, c in zip(weights[r], coefficients[:, 0, k], strict=True)) % q
            for k in range(degree)
        ]
        for r in order
    ]
    assert got.tolist() == exact


def test_sparse_conv_is_covered_by_band_tiles() -> None:
    rng = np.random.default_rng(0)
    conv = Conv2d(rng.normal(size=(4, 1, 7, 7)), np.zeros(4), (3, 3), (0, 0))
    linear = Linear(rng.normal(size=(2, 256)), np.zeros(2))
    artifact = make_artifact([conv, Poly((0.0, 0.5, 0.1)), Flatten(), linear], (1, 28, 28))
    plan = compile_batch_plan(artifact)
    first = plan.layers[0]
    assert isinstance(first, BatchAffine)
    order, tiles = tiles_for(first.terms[0].weights)
    assert sorted(order.tolist()) == list(range(256))
    assert [(t.first, t.last) for t in tiles] == [(32 * k, 32 * k + 32) for k in range(8)]
    multiplies = sum(t.weights.size for t in tiles)
    assert multiplies <= 256 * 784 / 3  # far fewer than dense, with no gather


# ---- encryption


def test_raw_access_matches_seal_serialization() -> None:
    assert raw_access_available()


@pytest.mark.parametrize("seed", [0, 3, 9, 12])  # x^2; x^2 + quartic; cubic; conv + cubic
def test_encrypted_random_networks_match_plaintext(
    seed: int, keys: Callable[[CkksParams], Keys]
) -> None:
    rng = np.random.default_rng(seed)
    artifact, _ = random_network(rng)
    plan = compile_batch_plan(artifact)
    samples = rng.normal(size=(50, *artifact.input_shape))
    got, _ = run_encrypted(plan, keys(plan.params), samples)
    expected = forward(artifact, samples)
    np.testing.assert_allclose(got, expected, atol=2e-3 * max(1.0, np.abs(expected).max()))
    # The published error estimate (the card's output precision rests on it) holds.
    assert np.abs(got - expected).max() <= PUBLISHED * estimate_batch_noise(plan).max


def test_numpy_products_are_bit_identical_to_seal(keys: Callable[[CkksParams], Keys]) -> None:
    rng = np.random.default_rng(12)  # a conv and a cubic activation
    artifact, _ = random_network(rng)
    plan = compile_batch_plan(artifact)
    samples = rng.normal(size=(20, *artifact.input_shape))
    fast, fast_cts = run_encrypted(plan, keys(plan.params), samples, backend="numpy")
    slow, slow_cts = run_encrypted(plan, keys(plan.params), samples, backend="seal")
    assert [save_seal(c) for c in fast_cts] == [save_seal(c) for c in slow_cts]
    np.testing.assert_array_equal(fast, slow)


def test_shipped_model_on_a_partial_batch(
    mnist_artifact: ModelArtifact,
    mnist_test_images: tuple[np.ndarray, np.ndarray],
    keys: Callable[[CkksParams], Keys],
) -> None:
    from he_service.protocol import preprocess

    images, _ = mnist_test_images
    samples = np.stack(
        [
            preprocess(x, mnist_artifact.preprocessing, mnist_artifact.input_shape)
            for x in images[:300]
        ]
    )
    plan = compile_batch_plan(mnist_artifact)
    got, _ = run_encrypted(plan, keys(plan.params), samples)
    expected = forward(mnist_artifact, samples)
    assert np.abs(got - expected).max() <= PUBLISHED * estimate_batch_noise(plan).max < 1e-2
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def test_relin_keys_for_mnist_fit_in_2_mb(mnist_artifact: ModelArtifact) -> None:
    params = compile_batch_plan(mnist_artifact).params
    keygen = seal.KeyGenerator(new_seal_context(params, prng_seed=1))
    assert len(save_seal(keygen.create_relin_keys())) <= 2_000_000


# ---- input checks


@pytest.fixture(scope="module")
def small() -> tuple[BatchPlan, BatchEvaluator]:
    artifact, _ = random_network(np.random.default_rng(0))
    plan = compile_batch_plan(artifact)
    return plan, BatchEvaluator(plan)


def test_check_inputs_refuses_what_does_not_fit(
    small: tuple[BatchPlan, BatchEvaluator], keys: Callable[[CkksParams], Keys]
) -> None:
    plan, evaluator = small
    k = keys(plan.params)
    cts = k.encrypt(np.zeros((plan.input_length, plan.slot_count)) + 0.5)
    evaluator.check_inputs(cts)
    with pytest.raises(BatchEvaluationError, match=f"takes {plan.input_length}"):
        evaluator.check_inputs(cts[:-1])
    with pytest.raises(BatchEvaluationError, match="not a SEAL ciphertext"):
        evaluator.check_inputs([*cts[:-1], b"bytes"])
    ev = seal.Evaluator(evaluator.context)

    lowered = seal.Ciphertext()
    ev.mod_switch_to_next(cts[0], lowered)
    with pytest.raises(BatchEvaluationError, match="wrong level"):
        evaluator.check_inputs([lowered, *cts[1:]])

    squared = seal.Ciphertext()
    ev.square(cts[0], squared)
    with pytest.raises(BatchEvaluationError, match="3 polynomials"):
        evaluator.check_inputs([squared, *cts[1:]])

    plain = seal.Plaintext()
    k.encoder.encode([0.5], 2.0**20, plain)
    scaled = seal.Ciphertext()
    seal.Encryptor(k.context, k.secret_key).encrypt_symmetric(plain, scaled)
    with pytest.raises(BatchEvaluationError, match="scale"):
        evaluator.check_inputs([*cts[:-1], scaled])

    transparent = seal.Ciphertext()
    ev.negate(cts[0], transparent)
    raw_view(transparent)[1] = 0
    with pytest.raises(BatchEvaluationError, match="transparent"):
        evaluator.check_inputs([transparent, *cts[1:]])


def test_backend_choice_is_checked(small: tuple[BatchPlan, BatchEvaluator]) -> None:
    plan, _ = small
    with pytest.raises(ValueError, match="backend"):
        BatchEvaluator(plan, backend="gpu")
