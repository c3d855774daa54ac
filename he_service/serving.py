"""A compiled plan as the predict routes see it: read a request, check it, evaluate, answer.

A *unit* is what one evaluation consumes (``he_service.protocol.plans``): one sample's
ciphertexts (latency) or one group of up to ``slot_count`` samples, one ciphertext per input
feature (batch). ``ServedPlan`` holds everything both kinds share (limits, key checks, frame
parsing, the card); one subclass per kind wraps its evaluator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import tenseal.sealapi as seal

from he_service.config import Config
from he_service.engine import (
    BatchEvaluator,
    BatchPlan,
    CompiledModel,
    EncryptedEvaluator,
    Plan,
    Timings,
)
from he_service.engine.batch.noise import estimate_batch_noise
from he_service.engine.batch.plan import INPUT, BatchAffine, BatchPoly, ciphertext_sizes
from he_service.engine.batch.stream import STREAM_BYTES
from he_service.engine.compiler import PUBLISHED
from he_service.engine.methods import GatherInput, TermPlan
from he_service.engine.plan import LinearStep
from he_service.keystore import StoredContext
from he_service.protocol import (
    BatchDecoding,
    BatchEncoding,
    CkksParams,
    GatherEncoding,
    PlanCard,
    PlanCosts,
    PlanKind,
    PlanLimits,
    PrefixDecoding,
    ProtocolError,
    decode_frames,
    framed_size,
    load_seal,
    output_step,
    save_seal,
)
from he_service.protocol.card import InputEncoding, OutputDecoding

__all__ = [
    "EncryptedRequest",
    "KeysDoNotFit",
    "PlanRefused",
    "ServedBatch",
    "ServedLatency",
    "ServedPlan",
    "TooManySamples",
    "resident_bytes",
    "serve_plans",
]

log = logging.getLogger(__name__)
Ciphertexts = list[seal.Ciphertext]


class PlanRefused(ValueError):
    """This server's limits leave no way to send the plan's requests; the model is refused."""


class KeysDoNotFit(ValueError):
    """A context made for other parameters, or lacking Galois keys the plan rotates by."""

    def __init__(self, message: str, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


class WorkerOutOfMemory(MemoryError):
    """SEAL ran out of memory during a request; this worker process stops after answering.

    SEAL's thread-safe memory pool can stay locked when an allocation fails inside it
    (``std::bad_alloc`` under its spin lock): the next allocation or release of that size then
    spins forever at 100% CPU. So the objects of the failed request are never released, the
    request gets a 503, and the worker stops (SIGTERM to itself: gunicorn starts a fresh one;
    a single waitress process exits for its supervisor to restart).
    """

    def __init__(self) -> None:
        super().__init__(
            "the server ran out of memory for this request; this worker restarts: retry in a "
            "few seconds, or send fewer samples per request"
        )


# Exceptions (with the frames that hold the failed request's SEAL objects) never released.
_RETAINED: list[BaseException] = []
_STOP_DELAY_SECONDS = 1.0


class _Stopper:
    """Send this process SIGTERM a moment after ``trigger``, from a thread started beforehand.

    Out of memory, starting a thread can fail ("can't start new thread"), so the thread that
    stops the worker is started with the served plans and only waits until then.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self) -> None:
        """Start the waiting thread in this process (again after a fork), once."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="he-oom-stop", daemon=True)
                self._thread.start()

    def trigger(self) -> None:
        self._event.set()

    def _run(self) -> None:
        self._event.wait()
        time.sleep(_STOP_DELAY_SECONDS)  # the 503 goes out first
        os.kill(os.getpid(), signal.SIGTERM)


_STOPPER = _Stopper()


@contextlib.contextmanager
def _seal_memory() -> Iterator[None]:
    try:
        yield
    except WorkerOutOfMemory:
        raise
    except MemoryError as exc:
        _RETAINED.append(exc)
        log.error("out of memory during an evaluation: this worker stops after answering 503")
        _STOPPER.trigger()
        raise WorkerOutOfMemory() from None


class TooManySamples(ValueError):
    """A request of more units than the plan's limit allows."""

    def __init__(self, samples: int, limit: int) -> None:
        super().__init__(f"a request of {samples} samples exceeds the limit of {limit} samples")
        self.samples, self.limit = samples, limit


@dataclass(frozen=True)
class EncryptedRequest:
    """The units of a request, loaded into SEAL and checked against the plan."""

    units: list[Ciphertexts]


class ServedPlan(ABC):
    """One plan of one model: its card, its limits, and its request pipeline.

    Args:
        model: the model's name (for messages).
        params: the plan's CKKS parameters.
        galois_steps: the rotation steps the client makes Galois keys for.
        input_encoding, output_decoding: how the client lays out inputs and reads outputs.
        costs: key bytes and bytes per unit (upper bounds).
        details: the engine's summary, published on the card.
        config: the server's limits.

    Raises:
        PlanRefused: one unit exceeds the body limit and the kind cannot send it in parts, or
            one ciphertext exceeds the part limit.
    """

    kind: ClassVar[PlanKind]
    context: seal.SEALContext  # input ciphertexts are loaded with it; set by each kind
    # Whether a unit larger than one request body may be uploaded in parts.
    sends_units_in_parts: ClassVar[bool]

    def __init__(
        self,
        *,
        model: str,
        params: CkksParams,
        galois_steps: tuple[int, ...],
        input_encoding: InputEncoding,
        output_decoding: OutputDecoding,
        costs: PlanCosts,
        details: dict[str, Any],
        config: Config,
    ) -> None:
        self.model, self.params, self.galois_steps = model, params, galois_steps
        self.inputs_per_unit = input_encoding.ciphertexts_per_unit
        self.samples_per_unit = input_encoding.samples_per_unit
        # One fresh input ciphertext, the largest a client may send (unseeded, all primes).
        self.max_ciphertext_bytes = params.ciphertext_bytes()
        self.max_units, self.max_upload_units = self._unit_limits(costs, config)
        self._config_samples = config.max_samples(self.kind)
        self.max_request_bytes = config.max_body_bytes(self.kind)
        limits = PlanLimits(
            max_samples_per_request=min(
                self._config_samples, self.max_units * self.samples_per_unit
            ),
            max_request_bytes=self.max_request_bytes,
            # The key store also refuses a context whose loaded (unseeded) keys, twice their
            # uploaded bytes, exceed its bound.
            max_context_bytes=min(config.max_context_bytes, config.key_store_max_bytes // 2),
            max_part_bytes=config.max_part_bytes,
        )
        if costs.public_key_bytes > limits.max_context_bytes:
            log.warning(
                "the %s plan of model %s needs %d bytes of public keys, above the %d bytes a "
                "context may have here: no client can use it",
                self.kind.value,
                model,
                costs.public_key_bytes,
                limits.max_context_bytes,
            )
        error = costs.expected_max_logit_error
        if error is None:
            raise PlanRefused(
                f"the {self.kind.value} plan of model {model!r} has no estimate of its "
                "encryption error, so no output precision to publish"
            )
        self._card = PlanCard(
            kind=self.kind,
            ckks=params,
            galois_steps=galois_steps,
            input_encoding=input_encoding,
            output_decoding=output_decoding,
            limits=limits,
            costs=costs,
            output_precision=output_step(error),
            details=details,
        )

    def _unit_limits(self, costs: PlanCosts, config: Config) -> tuple[int, int]:
        """Return the most units of one request body and of one upload."""
        per_unit = framed_size(self.inputs_per_unit, costs.request_bytes_per_unit) - framed_size(
            0, 0
        )
        in_body = (config.max_body_bytes(self.kind) - framed_size(0, 0)) // per_unit
        configured = -(-config.max_samples(self.kind) // self.samples_per_unit)
        if in_body >= 1:
            return min(configured, in_body), configured
        unit = "sample" if self.samples_per_unit == 1 else "group"
        what = f"one {unit} of the {self.kind.value} plan"
        if not self.sends_units_in_parts:
            raise PlanRefused(
                f"{what} is up to {per_unit} bytes, above the {config.max_body_bytes(self.kind)}"
                f"-byte request limit; raise the body limit or make the model's input smaller"
            )
        if framed_size(1, self.max_ciphertext_bytes) > config.max_part_bytes:
            raise PlanRefused(
                f"{what} is sent in parts, but one ciphertext is up to "
                f"{self.max_ciphertext_bytes} bytes, above the {config.max_part_bytes}-byte "
                "part limit (max_part_bytes)"
            )
        # Only uploads can carry such units, and their bodies are bounded part by part.
        return configured, configured

    def card(self) -> PlanCard:
        """Return the plan's card: parameters, encodings, limits, costs."""
        return self._card

    def _ciphertext_memory(self, limbs: int | None = None, polys: int = 2) -> int:
        """Return the memory of one loaded ciphertext (SEAL holds 64-bit words, no seed)."""
        limbs = self.params.data_primes if limbs is None else limbs
        return polys * limbs * self.params.poly_modulus_degree * 8

    def request_memory_bytes(self, count: int) -> int:
        """Estimate the peak memory of a request of ``count`` input ciphertexts.

        ``read`` copies the body's frames and loads every unit before ``run`` evaluates them
        one at a time, and the answer holds the outputs twice (serialized, then framed or
        encoded): frames + inputs + one unit's working set + outputs, plus an eighth for SEAL's
        and the allocator's slack (measured: ``benchmarks/memory_faults.py batch``).
        """
        units = max(1, count // self.inputs_per_unit)
        frames = count * self.params.ciphertext_bytes(seeded=True)
        inputs = count * self._ciphertext_memory()
        outputs = units * self.outputs_per_unit * self._ciphertext_memory() * 3
        total = frames + inputs + self.unit_working_bytes() + outputs
        return total + total // 8

    @property
    @abstractmethod
    def outputs_per_unit(self) -> int:
        """Return the output ciphertexts of one unit."""

    @abstractmethod
    def unit_working_bytes(self) -> int:
        """Estimate what evaluating one unit holds beyond its inputs and outputs."""

    def check_keys(self, keys: StoredContext) -> None:
        """Refuse a context that cannot evaluate this plan.

        Raises:
            KeysDoNotFit: other parameters, or Galois keys missing for some rotation steps.
        """
        if keys.params != self.params:
            raise KeysDoNotFit(
                f"context {keys.context_id[:12]}… was made for other CKKS parameters than the "
                f"{self.kind.value} plan of model {self.model!r}; make keys with the parameters "
                "of its card"
            )
        missing = keys.missing_steps(self.galois_steps)
        if missing:
            raise KeysDoNotFit(
                f"the context lacks Galois keys for rotation steps {missing}", missing=missing
            )

    @property
    def max_upload_ciphertexts(self) -> int:
        """Return the most ciphertexts the parts of one upload may hold."""
        return self.max_upload_units * self.inputs_per_unit

    def check_part(self, index: int, part: bytes) -> int:
        """Check one uploaded part's index, framing and ciphertext sizes; return its count.

        Raises:
            ProtocolError: an index beyond any upload, not a framed message, more ciphertexts
                than one upload may hold, or a ciphertext larger than a fresh one can be.
        """
        limit = self.max_upload_ciphertexts
        if index >= limit:  # every part holds at least one ciphertext
            raise ProtocolError(
                f"part index {index} is beyond the {limit} parts an upload may have"
            )
        items = decode_frames(part, max_items=limit)
        for number, item in enumerate(items):
            if len(item) > self.max_ciphertext_bytes:
                raise ProtocolError(
                    f"ciphertext {number} of part {index} is {len(item)} bytes; a fresh "
                    f"ciphertext of this plan is at most {self.max_ciphertext_bytes}"
                )
        return len(items)

    def check_count(self, count: int, *, uploaded: bool = False) -> int:
        """Check that ``count`` ciphertexts are whole units within the limit; return samples.

        Args:
            count: the request's ciphertexts.
            uploaded: they come from an upload, whose unit limit ignores the body limit.

        Returns:
            The samples they carry (a partly filled batch group counts in full).

        Raises:
            ProtocolError: not a positive multiple of the ciphertexts per unit.
            TooManySamples: more units than one request (or upload) may carry.
        """
        per_unit = self.inputs_per_unit
        if count < 1 or count % per_unit:
            unit = "sample" if self.samples_per_unit == 1 else "group of samples"
            raise ProtocolError(
                f"the {self.kind.value} plan of {self.model!r} takes {per_unit} ciphertexts per "
                f"{unit}; got {count}"
            )
        units = count // per_unit
        max_units = self.max_upload_units if uploaded else self.max_units
        if units > max_units:
            limit = min(self._config_samples, max_units * self.samples_per_unit)
            raise TooManySamples(units * self.samples_per_unit, limit)
        return units * self.samples_per_unit

    def read(self, parts: Iterable[bytes], count: int, timings: Timings) -> EncryptedRequest:
        """Load and check a request's framed ciphertexts, unit by unit.

        Args:
            parts: framed messages whose items, in order, are the request's ciphertexts (one
                body, or the parts of an upload, read one at a time).
            count: how many ciphertexts the parts hold in all, checked by ``check_count``.
            timings: where ``deserialize`` seconds go.

        Returns:
            The loaded units.

        Raises:
            ProtocolError: malformed frames or ciphertexts, or parts that hold another count.
            EvaluationError: a unit the evaluator refuses (level, scale, size).
        """
        return self.load(_items(parts, count), count, timings)

    def load(self, items: Iterable[bytes], count: int, timings: Timings) -> EncryptedRequest:
        """Load and check a request's serialized ciphertexts, unit by unit.

        Args:
            items: the request's ciphertexts, in order.
            count: how many there are, checked by ``check_count``.
            timings: where ``deserialize`` seconds go.

        Returns:
            The loaded units.

        Raises:
            ProtocolError: malformed ciphertexts, or another count than ``count``.
            EvaluationError: a unit the evaluator refuses (level, scale, size).
        """
        start = time.perf_counter()
        per_unit = self.inputs_per_unit
        loaded: list[Ciphertexts] = []
        unit: Ciphertexts = []
        index = 0
        for item in items:
            if index == count:
                raise ProtocolError(f"expected {count} ciphertexts, the request holds more")
            with _seal_memory():
                unit.append(
                    load_seal(
                        seal.Ciphertext,
                        item,
                        self.context,
                        what=f"input ciphertext {index}",
                        max_bytes=self.max_ciphertext_bytes,
                    )
                )
            index += 1
            if len(unit) == per_unit:
                self.check(unit)
                loaded.append(unit)
                unit = []
        if index != count:
            raise ProtocolError(f"expected {count} ciphertexts, the request holds {index}")
        timings.add("deserialize", time.perf_counter() - start)
        return EncryptedRequest(loaded)

    def run(self, request: EncryptedRequest, keys: StoredContext, timings: Timings) -> Ciphertexts:
        """Evaluate every unit of a request; return the output ciphertexts in order.

        Raises:
            WorkerOutOfMemory: SEAL ran out of memory (503; the worker stops).
        """
        with _seal_memory():
            return [
                ct
                for unit in request.units
                for ct in self.evaluate(unit, keys.relin_keys, keys.galois_keys, timings)
            ]

    def serialize(self, outputs: Ciphertexts, timings: Timings) -> list[bytes]:
        """Serialize output ciphertexts, in order."""
        start = time.perf_counter()
        items = [save_seal(ct) for ct in outputs]
        timings.add("serialize", time.perf_counter() - start)
        return items

    @abstractmethod
    def check(self, unit: Ciphertexts) -> None:
        """Refuse a unit the evaluator cannot take (raises ``EvaluationError``)."""

    @abstractmethod
    def evaluate(
        self,
        unit: Ciphertexts,
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> Ciphertexts:
        """Evaluate one checked unit; return its output ciphertexts."""


class ServedLatency(ServedPlan):
    """One sample per unit: the plan's input ciphertexts in, one ciphertext out."""

    kind = PlanKind.LATENCY
    sends_units_in_parts = False

    def __init__(self, model: str, plan: Plan, config: Config) -> None:
        summary = plan.summary()
        costs = plan.costs()
        super().__init__(
            model=model,
            params=plan.params,
            galois_steps=plan.galois_steps,
            input_encoding=GatherEncoding.from_json(plan.input_encoding),
            output_decoding=PrefixDecoding.from_json(plan.output_decoding),
            costs=PlanCosts(
                public_key_bytes=costs["public_key_bytes"],
                request_bytes_per_unit=costs["request_bytes_per_sample"],
                response_bytes_per_unit=costs["response_bytes_per_sample"],
                samples_per_unit=1,
                rotations=int(summary["rotations"]),
                galois_keys=int(summary["galois_keys"]),
                expected_max_logit_error=summary.get("expected_max_logit_error"),
            ),
            details=summary,
            config=config,
        )
        self._plan = plan
        self._rotations = int(summary["rotations"])
        self._evaluator = EncryptedEvaluator(plan)
        self.context = self._evaluator.context

    @property
    def outputs_per_unit(self) -> int:
        return 1

    def unit_working_bytes(self) -> int:
        # Every node's value may be live at once, and the rotated copies of a baby-step set
        # (bounded by the rotations); products are 3-polynomial before relinearization.
        values = len(self._plan.steps) + self._rotations + 2
        return values * self._ciphertext_memory(polys=3)

    def check(self, unit: Ciphertexts) -> None:
        self._evaluator.check_inputs(unit)

    def evaluate(
        self,
        unit: Ciphertexts,
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> Ciphertexts:
        return [self._evaluator.evaluate(unit, relin_keys, galois_keys, timings)]


class ServedBatch(ServedPlan):
    """Up to ``slot_count`` samples per unit: one ciphertext per feature in, one per output out."""

    kind = PlanKind.BATCH
    sends_units_in_parts = True

    def __init__(self, model: str, plan: BatchPlan, config: Config) -> None:
        error = float(f"{PUBLISHED * estimate_batch_noise(plan).max:.3g}")
        summary = {**plan.summary(), "expected_max_logit_error": error}
        costs = plan.costs()
        super().__init__(
            model=model,
            params=plan.params,
            galois_steps=(),
            input_encoding=BatchEncoding(plan.input_length, plan.slot_count),
            output_decoding=BatchDecoding(plan.output_length),
            costs=PlanCosts(
                public_key_bytes=costs["public_key_bytes"],
                request_bytes_per_unit=costs["request_bytes_per_group"],
                response_bytes_per_unit=costs["response_bytes_per_group"],
                samples_per_unit=plan.slot_count,
                rotations=0,
                galois_keys=0,
                expected_max_logit_error=error,
            ),
            details=summary,
            config=config,
        )
        self._plan = plan
        self._evaluator = BatchEvaluator(plan)
        self.context = self._evaluator.context
        self._working = self._working_bytes()

    @property
    def outputs_per_unit(self) -> int:
        return self._plan.output_length

    def unit_working_bytes(self) -> int:
        return self._working

    def _working_bytes(self) -> int:
        """Walk the layers as the evaluator does: a value lives from its layer to its last
        reader; a streamed layer and its activation hold one chunk instead of their width."""
        plan, degree = self._plan, self.params.poly_modulus_degree
        sizes = ciphertext_sizes(plan.layers)
        streamed: set[int] = set()
        for stream in getattr(self._evaluator, "_streams", {}).values():
            streamed |= {stream.source, stream.poly}
        last_read = {value: readers[-1] for value, readers in plan.readers().items() if readers}
        limbs = {INPUT: self.params.data_primes}
        live: dict[int, int] = {}
        peak = 0
        for index, layer in enumerate(plan.layers):
            if isinstance(layer, BatchPoly):
                width, limbs[index] = len(self._width(layer.source)), limbs[layer.source]
            else:
                width, limbs[index] = layer.rows, self.params.data_primes - layer.level
            if index in streamed:
                live[index] = STREAM_BYTES // 2
            else:
                live[index] = width * sizes[index] * limbs[index] * degree * 8
            # The inputs are counted by request_memory_bytes; values past their last reader go.
            peak = max(peak, sum(live.values()))
            for value in [v for v in live if last_read.get(v, len(plan.layers)) <= index]:
                del live[value]
        return peak

    def _width(self, value: int) -> range:
        """Return the ciphertexts of a value (the request's features for ``INPUT``)."""
        if value == INPUT:
            return range(self._plan.input_length)
        layer = self._plan.layers[value]
        if isinstance(layer, BatchAffine):
            return range(layer.rows)
        return self._width(layer.source)

    def check(self, unit: Ciphertexts) -> None:
        self._evaluator.check_inputs(unit)

    def evaluate(
        self,
        unit: Ciphertexts,
        relin_keys: seal.RelinKeys,
        galois_keys: seal.GaloisKeys | None,
        timings: Timings,
    ) -> Ciphertexts:
        return self._evaluator.evaluate(unit, relin_keys, timings)  # no rotations, no Galois keys


def _items(parts: Iterable[bytes], count: int) -> Iterator[bytes]:
    """Yield the items of framed parts, refusing a part of more than ``count`` in all."""
    index = 0
    for part in parts:
        items = decode_frames(part, max_items=max(1, count - index))
        index += len(items)
        yield from items


def resident_bytes(compiled: CompiledModel) -> int:
    """Estimate what a model's served plans hold for as long as it is served, before building.

    The latency plan keeps every weight diagonal encoded as a plaintext at its level (8 bytes
    per coefficient and prime); the batch plan keeps integer weights per prime of its level.
    """
    latency = compiled.latency
    degree, primes = latency.params.poly_modulus_degree, latency.params.data_primes
    total = 0
    for step in latency.steps:
        limbs = primes - step.level
        if isinstance(step, LinearStep):
            plaintexts = sum(_plaintext_count(term) for term in step.terms) + 1  # + the bias
        else:
            plaintexts = 4  # the polynomial's scalar constants, encoded as plaintexts
        total += plaintexts * limbs * degree * 8
    batch = compiled.batch
    for layer in batch.layers:
        if isinstance(layer, BatchAffine):
            limbs = batch.params.data_primes - layer.level
            weights = sum(int(term.weights.size) for term in layer.terms) + layer.rows
            total += weights * limbs * 8
    return total


def _plaintext_count(term: TermPlan) -> int:
    product = term.product
    if isinstance(product, GatherInput):
        return len(product.plaintexts)
    return len(product.diagonals)  # one plaintext per diagonal, without computing them


def serve_plans(compiled: CompiledModel, config: Config) -> dict[PlanKind, ServedPlan]:
    """Build the served plans of a compiled model, evaluators ready.

    Raises:
        PlanRefused: the server's limits leave no way to send one of the plans' requests.
    """
    _STOPPER.arm()
    name = compiled.artifact.name
    return {
        PlanKind.LATENCY: ServedLatency(name, compiled.latency, config),
        PlanKind.BATCH: ServedBatch(name, compiled.batch, config),
    }
