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
from he_service.engine.batch.plan import (
    INPUT,
    BatchAffine,
    BatchPlan,
    BatchPoly,
    BatchTerm,
    ciphertext_sizes,
)
from he_service.engine.batch.raw import raw_access_available, raw_view
from he_service.engine.batch.stream import STREAM_BYTES, Stream, plan_streams
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
        stream_bytes: a layer whose outputs and activations would hold more than this is
            evaluated in chunks of about this size, streamed into its reader (``stream.py``).

    Raises:
        BatchEvaluationError: the parameters or backend cannot run the plan.
    """

    def __init__(
        self, plan: BatchPlan, *, backend: str = "auto", stream_bytes: int = STREAM_BYTES
    ) -> None:
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
        self._sizes = ciphertext_sizes(plan.layers)
        self._runs: list[AffineRun | PolyRun | None] = []
        # Scales follow SEAL's own double arithmetic (products, division by the dropped prime),
        # so that constants can be prepared here, at the scale where they are added; the
        # compiler computed the same numbers to choose the weights: check that they agree.
        scales, levels = {INPUT: self.input_scale}, {INPUT: 0}
        for index, layer in enumerate(plan.layers):
            if isinstance(layer, BatchPoly):
                level = levels[layer.source]
                parms_id = self._levels[level].parms_id
                poly = prepare_activation(layer, scales[layer.source], parms_id, self._encoder)
                self._runs.append(poly)
                scales[index], levels[index] = poly.output_scale, level
                continue
            for term in layer.terms:
                self._check_term(term, layer, scales, levels)
            self._runs.append(
                prepare_affine(
                    layer,
                    [self._sizes[t.source] for t in layer.terms],
                    self._levels[layer.level].moduli,
                    layer.level,
                )
                if layer.terms
                else None  # a hidden layer whose units were all pruned
            )
            scale = layer.scale
            for offset in range(layer.rescales):
                scale = scale / float(self._levels[layer.level + offset].moduli[-1])
            scales[index], levels[index] = scale, layer.level + layer.rescales
        final = len(plan.layers) - 1
        self.output_scale = scales[final]
        self.output_parms_id = self._levels[levels[final]].parms_id
        last = plan.layers[final]
        assert isinstance(last, BatchAffine)
        self._constants = {
            int(row): [
                round_half_away(float(last.bias[row]) * self.output_scale) % q
                for q in self._levels[levels[final]].moduli
            ]
            for row in last.constant_rows()
        }
        if self.backend == "seal" and self._constants:
            raise BatchEvaluationError(
                "the model has constant outputs, which only the numpy backend can produce"
            )
        self._last_reader = {
            value: readers[-1] for value, readers in plan.readers().items() if readers
        }
        self._streams: dict[int, Stream] = {}
        if self.backend == "numpy":
            moduli = [level.moduli for level in self._levels]
            self._streams = plan_streams(plan, moduli, self._sizes, stream_bytes)
        self._streamed = {s.poly for s in self._streams.values()}
        self._accumulated = {s.reader: s for s in self._streams.values()}

    def _check_term(
        self,
        term: BatchTerm,
        layer: BatchAffine,
        scales: dict[int, float],
        levels: dict[int, int],
    ) -> None:
        """Refuse a plan whose scales differ from the ones SEAL will compute."""
        scale, level = scales[term.source], levels[term.source]
        if level + len(term.align) != layer.level:
            raise BatchEvaluationError("internal level mismatch in the plan's alignments")
        for offset, rescale in enumerate(term.align):
            if rescale:
                scale = scale / float(self._levels[level + offset].moduli[-1])
        product = scale * term.weight_scale * 2.0**term.shift
        if scale != term.source_scale or abs(product - layer.scale) > 1e-9 * layer.scale:
            raise BatchEvaluationError("internal scale mismatch in the plan's terms")

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
        values: dict[int, list[seal.Ciphertext]] = {INPUT: list(cts)}
        pending: dict[int, list[seal.Ciphertext]] = {}
        final = len(self.plan.layers) - 1
        for index, (layer, run) in enumerate(zip(self.plan.layers, self._runs, strict=True)):
            start = time.perf_counter()
            if index in self._streamed:
                continue  # evaluated chunk by chunk with its source
            if index in self._streams:
                self._stream(self._streams[index], values, pending, relin_keys, timings)
                continue
            if isinstance(layer, BatchPoly):
                assert isinstance(run, PolyRun)
                values[index] = evaluate_activation(
                    self._evaluator,
                    values[layer.source],
                    run,
                    relin_keys,
                    consume=self._owns(layer.source, index),
                )
                timings.add("activation", time.perf_counter() - start)
                self._release(values, [layer.source], index)
                continue
            if run is None:
                values[index] = []
                self._release(values, [t.source for t in layer.terms], index)
                continue
            assert isinstance(run, AffineRun)
            stream = self._accumulated.get(index)
            terms = [t for i, t in enumerate(layer.terms) if stream is None or i != stream.term]
            sources = [self._aligned(values[t.source], t, index) for t in terms]
            middle = time.perf_counter()
            if stream is None:
                out = self._affine(sources, run)
            else:  # the streamed term is in already: add the others and the bias
                self._check_sources(stream.rest, sources)
                out = pending.pop(index)
                level = self._levels[layer.level]
                affine_numpy(self._evaluator, sources, stream.rest, level.moduli, into=out)
            del sources
            self._release(values, [t.source for t in layer.terms], index)
            after = time.perf_counter()
            constant = set(self._constants) if index == final else set()
            self._rescale_relinearize(out, layer.rescales, relin_keys, skip=constant)
            values[index] = out
            timings.add("affine", after - middle)
            timings.add("activation", (middle - start) + (time.perf_counter() - after))
        vector = values[final]
        if self._constants:
            self._write_constants(vector)
        return vector

    def _stream(
        self,
        stream: Stream,
        values: dict[int, list[seal.Ciphertext]],
        pending: dict[int, list[seal.Ciphertext]],
        relin_keys: seal.RelinKeys,
        timings: Timings,
    ) -> None:
        """Run A, its activation and their share of B chunk by chunk (``stream.py``)."""
        ev = self._evaluator
        a = self.plan.layers[stream.source]
        b = self.plan.layers[stream.reader]
        assert isinstance(a, BatchAffine) and isinstance(b, BatchAffine)
        start = time.perf_counter()
        whole = [self._aligned(values[t.source], t, stream.source) for t in a.terms]
        poly = self._runs[stream.poly]
        assert isinstance(poly, PolyRun)
        read = b.terms[stream.term]
        a_moduli = self._levels[a.level].moduli
        b_moduli = self._levels[b.level].moduli
        out: list[seal.Ciphertext] | None = None
        affine = 0.0
        for chunk in stream.chunks:
            sources = [[whole[t][c] for c in columns] for t, columns in chunk.a_columns]
            self._check_sources(chunk.a_run, sources)
            begin = time.perf_counter()
            template = self._template(sources, chunk.a_run)
            part = affine_numpy(ev, sources, chunk.a_run, a_moduli, template)
            affine += time.perf_counter() - begin
            del sources
            self._rescale_relinearize(part, a.rescales, relin_keys, skip=set())
            activated = evaluate_activation(ev, part, poly, relin_keys, consume=True)
            del part
            if chunk.b_run is None:
                continue
            share = self._align_steps([activated[i] for i in chunk.b_columns], read.align, True)
            del activated
            self._check_sources(chunk.b_run, [share])
            if out is None:
                out = self._zeros(b, share[0], stream.rest.size)
            begin = time.perf_counter()
            targets = [out[row] for row in chunk.b_rows]
            affine_numpy(ev, [share], chunk.b_run, b_moduli, into=targets)
            affine += time.perf_counter() - begin
            del share, targets
        del whole
        self._release(values, [t.source for t in a.terms], stream.source)
        assert out is not None  # every unit of P is read by B (pruning)
        pending[stream.reader] = out
        timings.add("affine", affine)
        timings.add("activation", time.perf_counter() - start - affine)

    def _zeros(self, layer: BatchAffine, like: seal.Ciphertext, size: int) -> list[seal.Ciphertext]:
        """Return a layer's outputs set to zero, at its level and scale, to add products to."""
        ev = self._evaluator
        shaped = seal.Ciphertext()
        ev.negate(like, shaped)
        parms_id = self._levels[layer.level].parms_id
        if list(shaped.parms_id()) != parms_id:
            ev.mod_switch_to_inplace(shaped, parms_id)
        if shaped.size() != size:
            raise BatchEvaluationError("internal size mismatch in a streamed layer")
        out = []
        for _ in range(layer.rows):
            ct = seal.Ciphertext()
            ev.negate(shaped, ct)  # SEAL refuses to produce a zero ciphertext: zero it here
            raw_view(ct)[...] = 0
            ct.scale = layer.scale
            out.append(ct)
        return out

    def _owns(self, source: int, reader: int) -> bool:
        """Return whether layer ``reader`` may consume ``source``'s ciphertexts in place."""
        return source != INPUT and self._last_reader.get(source) == reader

    def _release(
        self, values: dict[int, list[seal.Ciphertext]], sources: list[int], at: int
    ) -> None:
        """Free the values whose last reader is layer ``at`` (the request's stay the caller's)."""
        for source in sources:
            if self._last_reader.get(source) == at and source in values:
                del values[source]

    def _aligned(
        self, vector: list[seal.Ciphertext], term: BatchTerm, reader: int
    ) -> list[seal.Ciphertext]:
        """Return the ciphertexts a term reads, brought down to its layer's level.

        The numpy backend reads the first limbs of a ciphertext above the layer's level (what
        a modulus switch leaves), so trailing modulus switches are skipped there.
        """
        cts = [vector[i] for i in term.inputs]
        return self._align_steps(cts, term.align, self._owns(term.source, reader))

    def _align_steps(
        self, cts: list[seal.Ciphertext], align: tuple[bool, ...], owned: bool
    ) -> list[seal.Ciphertext]:
        """Rescale or switch each ciphertext down, in place when ``owned``, else on copies."""
        steps = list(align)
        if self.backend == "numpy":
            while steps and not steps[-1]:
                steps.pop()
        if not steps:
            return cts
        ev = self._evaluator
        aligned = []
        for ct in cts:
            current = ct
            own = owned
            for rescale in steps:
                if own:
                    if rescale:
                        ev.rescale_to_next_inplace(current)
                    else:
                        ev.mod_switch_to_next_inplace(current)
                    continue
                fresh = seal.Ciphertext()
                if rescale:
                    ev.rescale_to_next(current, fresh)
                else:
                    ev.mod_switch_to_next(current, fresh)
                current, own = fresh, True
            aligned.append(current)
        return aligned

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

    def _check_sources(self, run: AffineRun, sources: list[list[seal.Ciphertext]]) -> None:
        """Refuse ciphertexts whose scale, size or level differ from what the plan says."""
        level = self._levels[run.level]
        limbs = len(level.moduli)
        for term_run, cts in zip(run.terms, sources, strict=True):
            term = term_run.term
            for ct in cts:
                if (
                    ct.scale != term.source_scale
                    or ct.size() != term_run.size
                    or ct.coeff_modulus_size() < limbs
                    or (self.backend == "seal" and list(ct.parms_id()) != level.parms_id)
                ):
                    raise BatchEvaluationError("internal level or scale mismatch at an affine map")

    def _template(self, sources: list[list[seal.Ciphertext]], run: AffineRun) -> seal.Ciphertext:
        """Return a ciphertext at the layer's level with its outputs' size (data irrelevant)."""
        like = next(
            cts[0]
            for term_run, cts in zip(run.terms, sources, strict=True)
            if term_run.size == run.size and cts
        )
        shaped = seal.Ciphertext()
        self._evaluator.negate(like, shaped)
        parms_id = self._levels[run.level].parms_id
        if list(shaped.parms_id()) != parms_id:
            self._evaluator.mod_switch_to_inplace(shaped, parms_id)
        return shaped

    def _affine(
        self, sources: list[list[seal.Ciphertext]], run: AffineRun
    ) -> list[seal.Ciphertext]:
        self._check_sources(run, sources)
        level = self._levels[run.level]
        if self.backend == "seal":
            return affine_seal(self._evaluator, self._encoder, sources, run, level.parms_id)
        template = self._template(sources, run)
        return affine_numpy(self._evaluator, sources, run, level.moduli, template)
