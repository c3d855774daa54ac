"""Encrypt, evaluate and decrypt in one process: measure a plan against its plain network.

Used to record encrypted agreement in manifests, by ``he-models evaluate`` and by tests. Keys
come from a seeded PRNG so that a measurement is reproducible; such keys are for measurement
only and never leave this function.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.evaluator import EncryptedEvaluator
from he_service.engine.plan import Plan
from he_service.protocol import decode_output, encode_input, galois_element
from he_service.protocol.params import new_seal_context

__all__ = ["encrypted_outputs"]


def encrypted_outputs(plan: Plan, samples: Iterable[np.ndarray], *, seed: int = 0) -> np.ndarray:
    """Return the decrypted outputs of the plan on preprocessed samples.

    Args:
        plan: the compiled plan.
        samples: preprocessed samples in the model's input shape.
        seed: seeds SEAL's PRNG (keys and encryption noise), for reproducible numbers.

    Returns:
        An array (samples, outputs).
    """
    evaluator = EncryptedEvaluator(plan)
    params = plan.params
    context = new_seal_context(params, prng_seed=seed)
    keygen = seal.KeyGenerator(context)
    relin = seal.RelinKeys()
    keygen.create_relin_keys(relin)
    galois = None
    if plan.galois_steps:
        galois = seal.GaloisKeys()
        elements = [galois_element(s, params.poly_modulus_degree) for s in plan.galois_steps]
        keygen.create_galois_keys(elements, galois)
    encoder = seal.CKKSEncoder(context)
    encryptor = seal.Encryptor(context, keygen.secret_key())
    decryptor = seal.Decryptor(context, keygen.secret_key())
    results = []
    for sample in samples:
        cts = []
        for vector in encode_input(sample, plan.input_encoding):
            plain = seal.Plaintext()
            encoder.encode(vector.tolist(), params.scale, plain)
            ct = seal.Ciphertext()
            encryptor.encrypt_symmetric(plain, ct)
            cts.append(ct)
        out = evaluator.evaluate(cts, relin, galois)
        decryptor.decrypt(out, plain)
        slots = np.asarray(encoder.decode_double(plain))
        results.append(decode_output(slots, plan.output_decoding))
    return np.stack(results)
