"""The batch plan (throughput mode): one sample per CKKS slot, no rotations, no Galois keys.

A request for up to ``N/2`` samples is one ciphertext per input feature (slot ``j`` of
ciphertext ``f`` holds feature ``f`` of sample ``j``); the answer is one ciphertext per model
output. Every affine map is then a sum of ciphertext-times-scalar terms and every activation an
element-wise polynomial. Only relinearization keys are needed.

Why it is fast (mnist-cnn, 4096 images: 1.05-1.3 s on 2 cores, about 0.3 ms per image):

* **Integer weights, evaluated as matrix products.** Layer ``k``'s weights are rounded to
  integers ``round(w * s_k)`` (``s_k`` gives ``weight_bits`` of precision relative to the
  largest weight). A ciphertext times an integer is modular arithmetic on its RNS limbs (in
  NTT form a constant is the same number in every coefficient), so a whole layer is an integer
  matrix product modulo each prime. It runs as float64 BLAS products on both cores and is
  exact: coefficients are cut into chunks of at most 32 bits so that no product reaches 2^53,
  and the chunks are put back together modulo the prime. The result is bit-identical to SEAL's
  ``multiply_plain`` + ``add`` with scalar plaintexts (the ``"seal"`` backend, kept as the
  reference and fallback), about 15x faster. Zero weights are skipped: sparse layers (a conv)
  become a few dense blocks over contiguous column bands.
* **Lazy rescaling.** Scales grow through an affine map and the following activation; primes
  are dropped only after the next affine map, where there are fewer ciphertexts, as many as
  bring the scale back to ``2^scale_bits``. mnist-cnn needs 4 data primes.
* **Deferred relinearization.** An activation's square is left at three polynomials; the next
  affine map works on those, so only its (fewer) outputs are relinearized (mnist-cnn: 64 + 10
  instead of 256 + 64), between their rescales.

The plan follows the normalised graph (``graph.py``), residual joins included: an affine layer
is a sum of terms, each reading an earlier value (the request or an activation). A join runs
at its deepest term's level; shallower terms come down by modulus switches (free on SEAL
memory: the products read fewer limbs) or, when their scale is far above the others', by
rescales; every term's integer products land on one scale thanks to its own weight scale and
an exact power-of-two shift. ``parameters`` explains the schedule. A straight chain never
aligns or shifts: its parameters and results are those of the chain-only plan.

The affine maps read and write SEAL's ciphertext memory through numpy views (``raw.raw_view``);
the layout is checked against SEAL's own serialization once per process and against each
ciphertext's metadata on every view. If that check fails the evaluator uses SEAL calls.

Memory: a group holds one ciphertext per unit of a layer, and SEAL's memory pool never gives
memory back. A layer too large to hold with its activation (LeNet-5's first convolution at
N=16384: 13.6 GB) is streamed in chunks through its activation into its one reader
(``stream``): a LeNet-5-sized group peaks at 6.9 GB instead of more than 19 GB.

Modules: ``plan`` (what a plan is), ``compiler`` and ``parameters`` (artifact to plan: integer
weights, CKKS parameters, levels and scales of joins), ``evaluator`` (the plan on ciphertexts;
each value is freed after its last reader) with ``affine`` (its two backends), ``products``
(exact modular matrix products and shifts), ``stream`` (chunked layers), ``raw`` (SEAL
memory) and ``activation``; ``errors``.
"""

from he_service.engine.batch.compiler import compile_batch_plan
from he_service.engine.batch.errors import BatchEvaluationError
from he_service.engine.batch.evaluator import BatchEvaluator
from he_service.engine.batch.plan import BatchAffine, BatchPlan, BatchPoly
from he_service.engine.batch.raw import raw_access_available

__all__ = [
    "BatchAffine",
    "BatchEvaluationError",
    "BatchEvaluator",
    "BatchPlan",
    "BatchPoly",
    "compile_batch_plan",
    "raw_access_available",
]
