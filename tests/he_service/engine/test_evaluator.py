"""Real encryption of small random networks against the plain polynomial network."""

import numpy as np
import pytest
import tenseal.sealapi as seal

from clients import KeySet
from he_service.engine import EncryptedEvaluator, EvaluationError, compile_plan, forward_plain
from he_service.engine.params import REGIMES
from he_service.protocol import decode_key_bundle, decode_output, encode_input, load_seal, save_seal

from .networks import random_network, random_residual_network, response_deviation


def _load_keys(keys: KeySet, evaluator: EncryptedEvaluator):  # type: ignore[no-untyped-def]
    bundle = decode_key_bundle(keys.public_context)
    relin = load_seal(seal.RelinKeys, bundle.sections["relin_keys"], evaluator.context, what="rk")
    galois = None
    if "galois_keys" in bundle.sections:
        galois = load_seal(
            seal.GaloisKeys, bundle.sections["galois_keys"], evaluator.context, what="gk"
        )
    return relin, galois


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 9])
def test_encrypted_random_networks_match_plaintext(seed: int) -> None:
    artifact, x = random_network(np.random.default_rng(seed))
    plan = compile_plan(artifact)
    evaluator = EncryptedEvaluator(plan)
    keys = KeySet.generate(plan.params, plan.galois_steps)
    relin, galois = _load_keys(keys, evaluator)
    cts = [
        load_seal(seal.Ciphertext, keys.encrypt(v), evaluator.context, what="input")
        for v in encode_input(x, plan.input_encoding)
    ]
    evaluator.check_inputs(cts)
    slots = keys._decrypt_slots(save_seal(evaluator.evaluate(cts, relin, galois))).real
    expected = forward_plain(artifact, x)
    tolerance = 1e-2 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(decode_output(slots, plan.output_decoding), expected, atol=tolerance)
    # Decrypt the whole response: outputs (replicated) and zeros, no partial sums.
    assert response_deviation(slots, expected, plan.output_decoding) < tolerance


@pytest.mark.parametrize("seed", [0, 4, 8, 10])
def test_encrypted_residual_networks_match_plaintext(seed: int) -> None:
    from he_service.engine.selfcheck import encrypted_outputs

    artifact, x = random_residual_network(np.random.default_rng(seed))
    plan = compile_plan(artifact)
    expected = forward_plain(artifact, x)
    tolerance = 2e-2 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(encrypted_outputs(plan, [x])[0], expected, atol=tolerance)


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: r.name)
def test_both_regimes_run_encrypted(regime) -> None:  # type: ignore[no-untyped-def]
    from he_service.engine.selfcheck import encrypted_outputs

    from .networks import make_artifact

    rng = np.random.default_rng(42)
    from he_service.artifacts import Conv2d, Flatten, Linear, Poly

    pool = np.zeros((3, 3, 2, 2))
    for c in range(3):
        pool[c, c] = 0.25
    artifact = make_artifact(
        [
            Conv2d(rng.normal(size=(3, 1, 3, 3)) / 3, rng.normal(size=3) * 0.1, (1, 1), (1, 1)),
            Poly((0.1, 0.5, 0.2)),
            Conv2d(pool, np.zeros(3), (2, 2), (0, 0)),
            Conv2d(rng.normal(size=(4, 3, 3, 3)) / 5, rng.normal(size=4) * 0.1, (1, 1), (1, 1)),
            Poly((0.1, 0.5, 0.2)),
            Flatten(),
            Linear(rng.normal(size=(5, 64)) / 8, rng.normal(size=5) * 0.1),
        ],
        (1, 8, 8),
    )
    plan = compile_plan(artifact, regimes=(regime,))
    x = rng.normal(size=(1, 8, 8))
    expected = forward_plain(artifact, x)
    got = encrypted_outputs(plan, [x])[0]
    assert np.abs(got - expected).max() <= plan.estimates["expected_max_logit_error"]


def test_wrong_scale_and_level_are_refused() -> None:
    artifact, _ = random_network(np.random.default_rng(0))
    plan = compile_plan(artifact)
    evaluator = EncryptedEvaluator(plan)
    keys = KeySet.generate(plan.params, ())
    context = evaluator.context
    plain = seal.Plaintext()
    seal.CKKSEncoder(context).encode([1.0], plan.params.scale * 2, plain)
    ct = seal.Ciphertext()
    seal.Encryptor(context, keys.secret_key).encrypt_symmetric(plain, ct)
    count = plan.input_ciphertexts
    with pytest.raises(EvaluationError, match="scale"):
        evaluator.check_inputs([ct] * count)
    with pytest.raises(EvaluationError, match=f"{count} ciphertexts"):
        evaluator.check_inputs([ct] * (count + 1))
    seal.Evaluator(context).mod_switch_to_next_inplace(ct)
    with pytest.raises(EvaluationError, match="wrong level"):
        evaluator.check_inputs([ct] * count)


def test_selfcheck_is_reproducible_per_seed_and_matches_plaintext() -> None:
    from he_service.engine.selfcheck import encrypted_outputs

    artifact, x = random_network(np.random.default_rng(7))
    plan = compile_plan(artifact)
    first = encrypted_outputs(plan, [x, -x], seed=1)
    assert np.array_equal(first, encrypted_outputs(plan, [x, -x], seed=1))
    assert not np.array_equal(first, encrypted_outputs(plan, [x, -x], seed=2))
    expected = np.stack([forward_plain(artifact, x), forward_plain(artifact, -x)])
    np.testing.assert_allclose(first, expected, atol=1e-2)


@pytest.mark.parametrize(
    "coeffs",
    [
        (0.1, 0.5, 0.25),  # ReLU-like quadratic
        (0.0, 0.6, 0.0, -0.05),  # cubic without x^2 term
        (0.05, 0.5, 0.3, 0.02),  # full cubic
        (0.1, 0.5, 0.2, 0.0, -0.01),  # quartic with negative lead
    ],
)
def test_every_polynomial_degree_evaluates_encrypted(coeffs: tuple[float, ...]) -> None:
    from he_service.artifacts import Linear, Poly
    from he_service.engine.selfcheck import encrypted_outputs

    from .networks import make_artifact

    rng = np.random.default_rng(len(coeffs))
    artifact = make_artifact(
        [
            Linear(rng.normal(size=(12, 9)) / 3, rng.normal(size=12)),
            Poly(coeffs),
            Linear(rng.normal(size=(5, 12)) / 3, rng.normal(size=5)),
            Poly(coeffs),
        ],
        (9,),
    )
    x = rng.normal(size=9) * 2
    plan = compile_plan(artifact)
    # one prime per square, two per cubic or quartic: the affine maps ride on them
    assert plan.depth == 2 * (1 if len(coeffs) == 3 else 2)
    expected = forward_plain(artifact, x)
    # the error the plan publishes on its card is the promise a user relies on
    tolerance = plan.estimates["expected_max_logit_error"]
    np.testing.assert_allclose(encrypted_outputs(plan, [x])[0], expected, atol=tolerance)


def test_composed_rotations_run_encrypted() -> None:
    """Under a tight key budget, steps without their own key run as sequences of key steps."""
    from he_service.engine.selfcheck import encrypted_outputs

    artifact, x = random_network(np.random.default_rng(2))
    free = compile_plan(artifact, key_budget_bytes=1 << 40)
    key = free.params.key_switch_key_bytes()
    tight = compile_plan(artifact, key_budget_bytes=(len(free.galois_steps) // 2 + 1) * key)
    assert tight.keys.routes, "some steps are composed"
    expected = forward_plain(artifact, x)
    tolerance = 2e-2 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(encrypted_outputs(tight, [x])[0], expected, atol=tolerance)
