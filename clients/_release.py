"""The one way decrypted values leave the SDK: flooded with noise, rounded to the precision.

A raw CKKS decryption is ``m + e`` with an error ``e`` that depends on the secret key: whoever
sees it next to the ciphertext (the server, or anyone it is shared with) can solve for the key
(Li and Micciancio, EUROCRYPT 2021). So the SDK never returns it. ``release`` decrypts,
measures the noise of each ciphertext from the imaginary parts of its slots (outputs are real,
so those are pure noise; the estimate OpenFHE uses, made robust with the median so that one
sample of a batch far outside the data does not set every sample's noise), adds Gaussian noise
of ``FLOOD_FACTOR`` times that spread to the outputs the ciphertext holds, rounds them to
multiples of the plan's ``output_precision`` and drops everything else (the other slots, the
imaginary parts).

What this buys, honestly: it is OpenFHE's default decryption (``FIXED_NOISE_DECRYPT``, noise
``sqrt(2)`` times the measured spread) plus rounding to the card's grid, so a released value
is a noisy, rounded linear equation in the key rather than an exact one, and averaging the
noise away takes many decryptions of the same ciphertext. It is not OpenFHE's provable
``NOISE_FLOODING_DECRYPT`` (IND-CPA-D with ``s`` bits of statistical security): that floods
with ``sqrt(12 t) 2^(s/2)`` times the noise estimate for ``t`` adversarial decryptions, about
``113000`` times the noise for ``s = 30, t = 1``, which the service's parameters (chosen for
precision at the smallest ring) cannot absorb: outputs would drown. The README gives the
measured costs of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from clients._crypto import KeySet
from he_service.protocol.card import OutputDecoding

__all__ = ["FLOOD_FACTOR", "noise_spread", "release"]

# OpenFHE's default decryption adds sqrt(M + 1) times the measured noise, with M = 1.
FLOOD_FACTOR = math.sqrt(2)
# The standard deviation of a centred Gaussian is this times the median of its absolute values.
_MEDIAN_TO_STD = 1.4826


def release(
    keys: KeySet,
    ciphertexts: Sequence[bytes],
    decoding: OutputDecoding,
    count: int,
    step: float,
) -> np.ndarray:
    """Decrypt output ciphertexts and return their outputs, noise-flooded and rounded.

    Args:
        keys: the keys that encrypted the request.
        ciphertexts: the output ciphertexts of ``count`` samples, as the server sent them.
        decoding: the plan's output decoding.
        count: how many samples they hold.
        step: the plan's output precision; every returned value is a multiple of it.

    Returns:
        The outputs ``(count, outputs)``.

    Raises:
        ProtocolError: the ciphertexts do not decode as the plan says.
    """
    slots = [keys._decrypt_slots(ct) for ct in ciphertexts]
    values = decoding.decode([s.real for s in slots], count)
    # Decoding each ciphertext's spread like its values gives every output its own ciphertext's.
    spreads = decoding.decode([np.full(s.shape, noise_spread(s)) for s in slots], count)
    # A generator freshly seeded from the operating system's entropy for every release, so the
    # flooding noise of one answer tells nothing about another's.
    noise = np.random.default_rng().normal(0.0, 1.0, values.shape) * FLOOD_FACTOR * spreads
    return np.asarray(np.round((values + noise) / step) * step)


def noise_spread(slots: np.ndarray) -> float:
    """Estimate the standard deviation of a decrypted ciphertext's noise from its complex slots.

    The imaginary parts of real outputs are pure noise; the median of their absolute values
    ignores the few slots whose values (and so noise) are far larger than the others'.
    """
    return _MEDIAN_TO_STD * float(np.median(np.abs(np.asarray(slots).imag)))
