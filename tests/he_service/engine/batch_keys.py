"""Client-side helpers for batch-plan tests: seeded keys, encryption, one encrypted run."""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from he_service.artifacts import ModelArtifact
from he_service.engine import forward_plain
from he_service.engine.batch import BatchEvaluator, BatchPlan, compile_batch_plan
from he_service.protocol.batch_encoding import decode_batch, encode_batch
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams, new_seal_context


class Keys:
    """A client's keys for one parameter set (seeded: reproducible, for tests only)."""

    def __init__(self, params: CkksParams) -> None:
        self.params = params
        self.context = new_seal_context(params, prng_seed=7)
        keygen = seal.KeyGenerator(self.context)
        self.secret_key = keygen.secret_key()
        self.relin_keys = seal.RelinKeys()
        keygen.create_relin_keys(self.relin_keys)
        self.encoder = seal.CKKSEncoder(self.context)
        self._encryptor = seal.Encryptor(self.context, self.secret_key)
        self._decryptor = seal.Decryptor(self.context, self.secret_key)

    def encrypt(self, group: np.ndarray) -> list[seal.Ciphertext]:
        cts = []
        for row in group:
            plain = seal.Plaintext()
            self.encoder.encode(row.tolist(), self.params.scale, plain)
            ct = seal.Ciphertext()
            self._encryptor.encrypt_symmetric(plain, ct)
            cts.append(ct)
        return cts

    def decrypt(self, cts: list[seal.Ciphertext]) -> np.ndarray:
        rows = []
        for ct in cts:
            plain = seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            rows.append(self.encoder.decode_double(plain))
        return np.asarray(rows)


def forward(artifact: ModelArtifact, samples: np.ndarray) -> np.ndarray:
    """Return the plaintext network's outputs, one row per sample."""
    return np.stack([forward_plain(artifact, s) for s in samples])


def run_encrypted(
    plan: BatchPlan, keys: Keys, samples: np.ndarray, backend: str = "auto"
) -> tuple[np.ndarray, list[seal.Ciphertext]]:
    """Encrypt one group of samples, evaluate the plan, decrypt; also return the ciphertexts."""
    evaluator = BatchEvaluator(plan, backend=backend)
    (group,) = encode_batch(samples, plan.slot_count)
    cts = keys.encrypt(group)
    evaluator.check_inputs(cts)
    out = evaluator.evaluate(cts, keys.relin_keys)
    assert len(out) == plan.output_length
    assert all(ct.size() == 2 and ct.parms_id() == evaluator.output_parms_id for ct in out)
    return decode_batch([keys.decrypt(out)], len(samples)), out


def check_simulation(artifact: ModelArtifact, samples: np.ndarray) -> BatchPlan:
    """Compile the batch plan; check its plain simulation and parameters; return it.

    The exact simulation matches the network, the integer weights the evaluator uses stay
    close to it, and the primes fit 128-bit security with none above the 60-bit special one.
    """
    plan = compile_batch_plan(artifact)
    expected = forward(artifact, samples)
    features = samples.reshape(len(samples), -1).T
    bound = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(plan.simulate(features).T, expected, atol=1e-9 * bound)
    quantised = plan.simulate(features, quantised=True).T
    assert np.abs(quantised - expected).max() <= 5e-3 * bound
    assert plan.input_length == features.shape[0]
    assert plan.output_length == expected.shape[1]
    params = plan.params
    assert sum(params.coeff_modulus_bits) <= MAX_COEFF_BITS_128[params.poly_modulus_degree]
    assert max(params.coeff_modulus_bits[:-1]) <= params.coeff_modulus_bits[-1] <= 60
    return plan
