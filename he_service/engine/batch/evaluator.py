"""The batch evaluator: a plan bound to SEAL objects, run on one group of samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from he_service.engine.batch.activation import PolyRun, evaluate_activation, prepare_activation
from he_service.engine.batch.affine import (
    AffineRun,
    affine_numpy,
    affine_seal,
    prepare_affine,
    round_half_away,
)
from he_service.engine.batch.errors import BatchEvaluationError
from he_service.engine.batch.plan import BatchAffine, BatchPlan
from he_service.engine.batch.raw import raw_access_available, raw_view
from he_service.engine.evaluator import Timings
from he_service.protocol.params import seal_context

__all__ = ["BatchEvaluator"]

_log = logging.getLogger(__name__)


@dataclass
class _Level:
    parms_id: list[int]
    moduli: list[int]


class BatchEvaluator:
    """A batch plan bound to SEAL objects; every constant is prepared when the model loads.

    Args:
        plan: the compiled plan.
        backend: ``"auto"`` (integer products on SEAL memory when the layout check passes),
            ``"numpy"`` (require that) or ``"seal"`` (``multiply_plain`` per weight: the slow
            reference). The SEAL path encodes each scalar on the fly (6 us, 2% of its time);
            caching them would take up to 12,000 plaintexts of 256 KB for mnist-cnn.

    Raises:
        BatchEvaluationError: the parameters or backend cannot run the plan.
    """

    def __init__(self, plan: BatchPlan, *, backend: str = "auto") -> None:
        if backend not in ("auto", "numpy", "seal"):
            raise ValueError("backend must be 'auto', 'numpy' or 'seal'")
        raw = raw_access_available()
        if backend == "numpy" and not raw:
            raise BatchEvaluationError("numpy backend unavailable: SEAL memory layout differs")
        self.backend = "numpy" if backend in ("auto", "numpy") and raw else "seal"
        if backend == "auto" and not raw:
            _log.warning(
                "SEAL's ciphertext layout is not the expected one: batch affine maps fall back "
                "to multiply_plain, about 15x slower"
            )
        self.plan = plan
        self.context = seal_context(plan.params)
        self._encoder = seal.CKKSEncoder(self.context)
        self._evaluator = seal.Evaluator(self.context)
        self._levels: list[_Level] = []
        data = self.context.first_context_data()
        while data is not None:
            self._levels.append(
                _Level(list(data.parms_id()), [m.value() for m in data.parms().coeff_modulus()])
            )
            data = data.next_context_data()
        if len(self._levels) < plan.depth + 1:
            raise BatchEvaluationError("parameters hold fewer levels than the plan drops")
        self.input_parms_id = self._levels[0].parms_id
        self.input_scale = plan.params.scale
        self._runs: list[AffineRun | PolyRun] = []
        # Scales follow SEAL's own double arithmetic (products, division by the dropped prime),
        # so that constants can be prepared here, at the scale where they are added.
        scale, level = self.input_scale, 0
        for layer in plan.layers:
            if isinstance(layer, BatchAffine):
                run = prepare_affine(layer, level, self._levels[level].moduli, scale)
                self._runs.append(run)
                scale = run.output_scale
                for _ in range(layer.rescales):
                    scale = scale / float(self._levels[level].moduli[-1])
                    level += 1
            else:
                parms_id = self._levels[level].parms_id
                poly = prepare_activation(layer, scale, parms_id, self._encoder)
                self._runs.append(poly)
                scale = poly.output_scale
        self.output_scale = scale
        self.output_parms_id = self._levels[level].parms_id
        last = self._runs[-1]
        assert isinstance(last, AffineRun)
        self._constants = {
            int(row): [
                round_half_away(float(last.layer.bias[row]) * scale) % q
                for q in self._levels[level].moduli
            ]
            for row in last.constant_rows
        }
        if self.backend == "seal" and self._constants:
            raise BatchEvaluationError(
                "the model has constant outputs, which only the numpy backend can produce"
            )

    def check_inputs(self, cts: Sequence[seal.Ciphertext]) -> None:
        """Refuse inputs that do not fit the plan.

        Args:
            cts: the request's ciphertexts, one per input feature.

        Raises:
            BatchEvaluationError: wrong count, level, scale or size, or a transparent input.
        """
        expected = self.plan.input_length
        if len(cts) != expected:
            raise BatchEvaluationError(
                f"got {len(cts)} input ciphertexts; the model takes {expected}, one per input "
                f"feature (sample j in slot j)"
            )
        for index, ct in enumerate(cts):
            what = f"input ciphertext {index}"
            if not isinstance(ct, seal.Ciphertext):
                raise BatchEvaluationError(f"{what} is not a SEAL ciphertext")
            if ct.size() != 2:
                raise BatchEvaluationError(
                    f"{what} has {ct.size()} polynomials; a fresh ciphertext has 2"
                )
            if ct.is_transparent():
                raise BatchEvaluationError(f"{what} is transparent (not encrypted); encrypt it")
            if not ct.is_ntt_form():
                raise BatchEvaluationError(f"{what} is not in NTT form; encrypt it with CKKS")
            if list(ct.parms_id()) != self.input_parms_id:
                raise BatchEvaluationError(
                    f"{what} is at the wrong level ({ct.coeff_modulus_size()} primes); encrypt "
                    f"at the top level of the card's parameters "
                    f"({len(self.plan.params.coeff_modulus_bits) - 1} primes)"
                )
            if ct.scale != self.input_scale:
                raise BatchEvaluationError(
                    f"{what} has scale {ct.scale:.6g}; the card asks for 2^"
                    f"{self.plan.params.scale_bits}"
                )

    def evaluate(
        self,
        cts: Sequence[seal.Ciphertext],
        relin_keys: seal.RelinKeys,
        timings: Timings | None = None,
    ) -> list[seal.Ciphertext]:
        """Evaluate the plan on input ciphertexts checked by ``check_inputs``.

        Args:
            cts: one ciphertext per input feature.
            relin_keys: the caller's relinearization keys.
            timings: where to add seconds: ``affine`` (the integer matrix products) and
                ``activation`` (SEAL: products, relinearizations, rescales).

        Returns:
            One ciphertext (size 2) per model output, sample j in slot j.
        """
        timings = timings if timings is not None else Timings()
        vector = list(cts)
        for run in self._runs:
            start = time.perf_counter()
            if isinstance(run, PolyRun):
                vector = evaluate_activation(self._evaluator, vector, run, relin_keys)
                timings.add("activation", time.perf_counter() - start)
                continue
            vector = self._affine(vector, run)
            middle = time.perf_counter()
            timings.add("affine", middle - start)
            constant = set(self._constants) if run is self._runs[-1] else set()
            self._rescale_relinearize(vector, run.layer.rescales, relin_keys, skip=constant)
            timings.add("activation", time.perf_counter() - middle)
        if self._constants:
            self._write_constants(vector)
        return vector

    def _rescale_relinearize(
        self,
        vector: list[seal.Ciphertext],
        rescales: int,
        relin_keys: seal.RelinKeys,
        skip: set[int],
    ) -> None:
        """Drop all primes but one, relinearize, drop the last one.

        Rescaling a 3-polynomial ciphertext adds rounding noise times s^2, about sqrt(N)
        times more than with 2 (measured on mnist-cnn: a logit error of 2.4 instead of 1e-3 when
        relinearizing after the last rescale). While the scale is still far above its final
        value that noise is negligible, and relinearizing with fewer primes is cheaper.
        """
        ev = self._evaluator
        for index, ct in enumerate(vector):
            if index in skip:
                continue
            if ct.size() > 2:
                for _ in range(rescales - 1):
                    ev.rescale_to_next_inplace(ct)
                ev.relinearize_inplace(ct, relin_keys)
                if rescales:
                    ev.rescale_to_next_inplace(ct)
            else:
                for _ in range(rescales):
                    ev.rescale_to_next_inplace(ct)

    def _write_constants(self, vector: list[seal.Ciphertext]) -> None:
        """Turn outputs whose weights all round to zero into their known value (c1 = 0)."""
        template = next(ct for i, ct in enumerate(vector) if i not in self._constants)
        for row, residues in self._constants.items():
            ct = seal.Ciphertext()
            self._evaluator.negate(template, ct)
            view = raw_view(ct)
            view[0] = np.asarray(residues, dtype=np.uint64)[:, None]
            view[1:] = 0
            ct.scale = self.output_scale
            vector[row] = ct

    def _affine(self, vector: list[seal.Ciphertext], run: AffineRun) -> list[seal.Ciphertext]:
        inputs = [vector[i] for i in run.layer.inputs]
        level = self._levels[run.level]
        for ct in inputs:
            if ct.scale != run.input_scale or list(ct.parms_id()) != level.parms_id:
                raise BatchEvaluationError("internal level or scale mismatch at an affine map")
        if self.backend == "seal":
            return affine_seal(self._evaluator, self._encoder, inputs, run, level.parms_id)
        return affine_numpy(self._evaluator, inputs, run, level.moduli)
