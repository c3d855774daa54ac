"""Numpy views of SEAL ciphertext memory, and the check that they read what SEAL writes.

The affine maps read and write coefficients directly instead of calling SEAL once per weight.
The layout is checked against SEAL's own serialization once per process
(``raw_access_available``) and against each ciphertext's metadata on every view.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import tenseal.sealapi as seal

from he_service.protocol.seal_io import save_seal
from he_service.protocol.seal_memory import object_words, sample_encryption, seal_payload

__all__ = ["RawAccessError", "raw_access_available", "raw_view"]


class RawAccessError(RuntimeError):
    """The ciphertext's memory layout is not the one this module reads."""


_U64 = ctypes.c_uint64


def raw_view(ct: seal.Ciphertext) -> np.ndarray:
    """Return a writable numpy view (size, limbs, N) of a ciphertext's coefficients.

    The view shares memory with ``ct``: use it only while ``ct`` is alive and not resized.

    Raises:
        RawAccessError: the memory does not match the ciphertext's metadata.
    """
    words = object_words(ct)
    if words is None:
        raise RawAccessError("no C++ object behind the ciphertext")
    size, degree, limbs = ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()
    count = size * degree * limbs
    if (
        list(words[0:4]) != list(ct.parms_id())
        or (words[5], words[6], words[7], words[13]) != (size, degree, limbs, count)
        or words[12] < count
        or not words[14]
        or size < 1
    ):
        raise RawAccessError("ciphertext metadata does not match the expected layout")
    array = np.ctypeslib.as_array((_U64 * count).from_address(words[14])).reshape(
        size, limbs, degree
    )
    if any(int(array[i, 0, 0]) != ct.data(i) for i in range(size)):
        raise RawAccessError("ciphertext data pointer does not match SEAL's accessors")
    return array


@functools.cache
def raw_access_available() -> bool:
    """Check once per process that ``raw_view`` reads exactly what SEAL serializes."""
    try:
        context, encryptor, plain = sample_encryption()
        ct = seal.Ciphertext()
        encryptor.encrypt_symmetric(plain, ct)
        seal.Evaluator(context).square_inplace(ct)  # size 3, data written by SEAL itself
        view = raw_view(ct)
        payload = seal_payload(save_seal(ct))
        return bool(payload[-view.nbytes :] == view.tobytes()) and view.shape == (3, 2, 4096)
    except Exception:  # any mismatch means: do not touch SEAL memory
        return False
