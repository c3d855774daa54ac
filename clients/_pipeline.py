"""Score many rows as a pipeline: encrypt on every core while the previous group is sent.

SEAL holds the GIL, so threads would not encrypt in parallel: a pool of processes does, each
loading the secret key once. The main process preprocesses a group, splits its slot vectors
among the workers, and while they encrypt it sends the group before and decrypts its answer.

Where the encryption and decryption run is a ``_Backend``: this machine's process pool
(``_Encryptors``), or a Dask cluster (``clients._dask``) whose workers also decrypt the answers.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import tenseal.sealapi as seal

from clients._outputs import Outputs, flagged_outputs
from he_service.protocol import (
    Buffer,
    CkksParams,
    PlanKind,
    framed_size,
    load_seal,
    preprocess_rows,
    save_seal,
    save_seeded,
    seal_context,
)
from he_service.protocol.seal_io import sweep_scratch_files

if TYPE_CHECKING:
    from clients._client import ModelSession

__all__ = ["ScoredGroup", "group_rows_for", "score_groups"]

# Groups encrypted ahead of the one being sent: one keeps every worker busy during a request.
_AHEAD = 1


@dataclass(frozen=True)
class ScoredGroup:
    """The released outputs of one group of rows, ``rows[start:start + len(outputs)]``."""

    index: int
    start: int
    outputs: Outputs
    bytes_sent: int


class _Chunk(Protocol):
    """Some of a group's ciphertexts being made: a local ``Future`` or a watched Dask one."""

    def result(self) -> list[bytes]: ...


class _Group(Protocol):
    """A group's ciphertexts being made, wherever they are made."""

    def ciphertexts(self) -> contextlib.AbstractContextManager[Sequence[Buffer]]:
        """Wait for the ciphertexts, in order; they stay valid until the block ends."""

    def cancel(self) -> None:
        """Free what the group holds; it will not be sent."""


class _Backend(Protocol):
    """Where a group's slot vectors are encrypted and its output ciphertexts released."""

    def encrypt(self, vectors: np.ndarray) -> _Group:
        """Start encrypting slot vectors, in order."""

    def release(self, outputs: list[bytes], samples: int, timings: dict[str, float]) -> np.ndarray:
        """Decrypt a group's output ciphertexts into released outputs (``clients._release``)."""

    def close(self) -> None:
        """Stop the workers (or free the cluster's copy of the key); pending work is dropped."""


def group_rows_for(session: ModelSession) -> int:
    """Return the rows of one group: a batch group's slots, or the samples of one request."""
    spec = session.spec
    if spec.kind == PlanKind.BATCH:
        return spec.samples_per_unit
    return max(1, spec.limits.max_samples_per_request)


def score_groups(
    session: ModelSession,
    rows: np.ndarray,
    *,
    group_rows: int | None = None,
    workers: int | None = None,
    skip: Collection[int] = (),
    dask: Any = None,
) -> Iterator[ScoredGroup]:
    """Yield the released outputs of ``rows`` group by group, in order, as they arrive.

    Args:
        session: the model session whose keys and plan are used.
        rows: raw samples, one per row (any shape with the model's number of values).
        group_rows: rows per group (at most, and by default, ``group_rows_for(session)``).
        workers: encrypting processes (default: every core; 1 encrypts in this process); with
            ``dask``, the chunks each group is split into (default: the cluster's threads).
        skip: indices of groups not to score (already scored by an earlier run).
        dask: a Dask scheduler address or a ``distributed.Client``: encrypt and decrypt on
            that cluster's workers instead of this machine (``clients._dask``).

    Raises:
        ValueError: ``group_rows`` or ``workers`` below 1, or ``group_rows`` above one group.
        DaskClusterError: the cluster cannot be reached, or failed during the run.
    """
    limit = group_rows_for(session)
    size = limit if group_rows is None else group_rows
    if not 1 <= size <= limit:
        raise ValueError(f"group_rows must be between 1 and {limit} for this plan, got {size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    starts = [s for i, s in enumerate(range(0, len(rows), size)) if i not in skip]
    indices = [s // size for s in starts]
    backend = _backend(session, workers, dask)
    queued: deque[tuple[int, int, int, _Group]] = deque()
    try:
        for i, start in zip(indices, starts, strict=True):
            group = rows[start : start + size]
            began = time.perf_counter()
            pending = backend.encrypt(_vectors(session, group))
            _add(session.last_timings, "prepare", time.perf_counter() - began)
            queued.append((i, start, len(group), pending))
            if len(queued) > _AHEAD:
                yield _finish(session, backend, *queued.popleft())
        while queued:
            yield _finish(session, backend, *queued.popleft())
    finally:
        for *_, pending in queued:
            pending.cancel()
        backend.close()


def _backend(session: ModelSession, workers: int | None, dask: Any) -> _Backend:
    """Start this machine's encrypting processes, or hand the key to a Dask cluster."""
    if dask is None:
        return _Encryptors(session, os.cpu_count() or 1 if workers is None else workers)
    backend: _Backend = _dask_module().DaskBackend(session, dask, chunks=workers)
    return backend


def _dask_module() -> ModuleType:
    """Import ``clients._dask`` (and so Dask) only for a run that asks for a cluster.

    Raises:
        DaskClusterError: Dask is not installed.
    """
    from clients._errors import DaskClusterError

    try:
        from clients import _dask
    except ImportError as exc:
        if exc.name not in {"dask", "distributed"}:
            raise
        raise DaskClusterError(
            "scoring on a Dask cluster needs the dask extra: pip install 'he-inference[dask]' "
            "(on this machine and on every worker)"
        ) from None
    return _dask


def _vectors(session: ModelSession, rows: np.ndarray) -> np.ndarray:
    """Preprocess and encode ``rows`` into the slot vectors of their units, in order."""
    prepared = preprocess_rows(rows, session.card.preprocessing, session.card.input_shape)
    return np.asarray([v for unit in session.spec.input_encoding.units(prepared) for v in unit])


def _finish(
    session: ModelSession,
    backend: _Backend,
    index: int,
    start: int,
    samples: int,
    pending: _Group,
) -> ScoredGroup:
    """Wait for a group's ciphertexts, send them, decrypt and release the answer.

    The wait is timed as ``encrypt_wait``: the encryption the pipeline failed to hide.
    """
    waited = time.perf_counter()
    with pending.ciphertexts() as ciphertexts:
        timings = session.last_timings
        _add(timings, "encrypt_wait", time.perf_counter() - waited)
        outputs = session._send_group(ciphertexts, timings)
        sent = framed_size(len(ciphertexts), sum(map(len, ciphertexts)))
    released = backend.release(outputs, samples, timings)
    return ScoredGroup(index, start, flagged_outputs(released, session.card, stacklevel=4), sent)


def _add(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds


def _chunks(vectors: np.ndarray, count: int) -> list[np.ndarray]:
    """Split slot vectors into at most ``count`` runs of nearly equal length, in order."""
    size = math.ceil(len(vectors) / count)
    return [vectors[i : i + size] for i in range(0, len(vectors), size)]


class _Results:
    """A group made in chunks that each return their ciphertexts (Dask, or this process)."""

    def __init__(self, chunks: list[_Chunk]) -> None:
        self._chunks = chunks

    @contextlib.contextmanager
    def ciphertexts(self) -> Iterator[Sequence[Buffer]]:
        yield [ct for chunk in self._chunks for ct in chunk.result()]

    def cancel(self) -> None:
        """Nothing to free: the backend drops pending chunks when it closes."""


class _Shared:
    """A group the local pool encrypts into a shared scratch file.

    Pool workers write their ciphertexts into the file at fixed offsets and return only the
    lengths; this process maps the file and sends slices of it. Pickling the ciphertexts back
    through pipes instead cost as much CPU as encrypting them (200 MB per MNIST group).
    """

    def __init__(self, futures: list[Future[list[int]]], scratch: _Scratch) -> None:
        self._futures, self._scratch = futures, scratch

    @contextlib.contextmanager
    def ciphertexts(self) -> Iterator[Sequence[Buffer]]:
        with self._scratch as scratch:
            lengths = [n for future in self._futures for n in future.result()]
            slices = scratch.slices(lengths)
            try:
                yield slices
            finally:
                for piece in slices:
                    piece.release()

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()
        self._scratch.close()


class _Scratch:
    """A file the workers fill with one group's ciphertexts, each in a slot of ``slot`` bytes.

    The file is unlinked as soon as it is mapped here, so a killed run leaves nothing behind
    but the rare file of a run killed during its first moments (removed by the next run).
    """

    def __init__(self, count: int, slot: int) -> None:
        size = count * slot
        directory = _scratch_dir(size)
        # The seal_io scratch naming (he-<pid>-...), so that its sweep finds those of dead runs.
        handle, self.path = tempfile.mkstemp(prefix=f"he-{os.getpid()}-score-", dir=directory)
        try:
            os.ftruncate(handle, size)
        except OSError:
            os.close(handle)
            os.unlink(self.path)
            raise
        self._handle, self.slot = handle, slot
        self._map: mmap.mmap | None = None

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def slices(self, lengths: list[int]) -> list[memoryview]:
        """Map the filled file and return each ciphertext's bytes."""
        self._map = mmap.mmap(self._handle, len(lengths) * self.slot, prot=mmap.PROT_READ)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with memoryview(self._map) as view:
            return [view[i * self.slot : i * self.slot + n] for i, n in enumerate(lengths)]

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a slice still referenced: freed with it
                self._map.close()
            self._map = None
        if self._handle >= 0:
            os.close(self._handle)
            self._handle = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _scratch_dir(size: int) -> str | None:
    """Return memory-backed /dev/shm when it has room for twice the two groups in flight."""
    try:
        stats = os.statvfs("/dev/shm")  # noqa: S108  (mkstemp: private, unpredictable names)
    except OSError:
        return None
    return "/dev/shm" if stats.f_bavail * stats.f_frsize > 4 * size else None  # noqa: S108


def _sweep_scratch() -> None:
    """Remove the scratch files of runs that were killed (their process is gone)."""
    for directory in {"/dev/shm", tempfile.gettempdir()}:  # noqa: S108
        sweep_scratch_files(directory)


class _Encryptors:
    """The local backend: encrypt in a process pool (or here, with one worker), decrypt here."""

    def __init__(self, session: ModelSession, workers: int) -> None:
        self._session = session
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._slot = session.keys.params.ciphertext_bytes(seeded=True)
        if workers > 1:
            _sweep_scratch()
            # spawn, not fork: a forked child would inherit SEAL's and httpx's threads' locks.
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_load_key,
                initargs=(session.keys.params, save_seal(session.keys.secret_key)),
            )
        else:
            _load_key(session.keys.params, save_seal(session.keys.secret_key))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def encrypt(self, vectors: np.ndarray) -> _Group:
        """Start encrypting ``vectors``, in order, one chunk per worker."""
        if self._pool is None:
            done: Future[list[bytes]] = Future()
            done.set_result(_encrypt(vectors))
            return _Results([done])
        scratch = _Scratch(len(vectors), self._slot)
        try:
            futures, first = [], 0
            for chunk in _chunks(vectors, self._workers):
                futures.append(
                    self._pool.submit(_encrypt_into, chunk, scratch.path, first, self._slot)
                )
                first += len(chunk)
        except BaseException:
            scratch.close()
            raise
        return _Shared(futures, scratch)

    def release(self, outputs: list[bytes], samples: int, timings: dict[str, float]) -> np.ndarray:
        return self._session._decode(outputs, samples, timings)


# The worker's encryption objects, made once per process by ``_load_key``.
_state: dict[str, object] = {}


def _load_key(params: CkksParams, secret: bytes) -> None:
    context = seal_context(params)
    key = load_seal(seal.SecretKey, secret, context, what="secret key")
    _state.update(
        params=params,
        encoder=seal.CKKSEncoder(context),
        encryptor=seal.Encryptor(context, key),
    )


def _encrypt(vectors: np.ndarray) -> list[bytes]:
    """Encrypt slot vectors as ``KeySet.encrypt`` does, with this process's loaded key."""
    params = _state["params"]
    encoder, encryptor = _state["encoder"], _state["encryptor"]
    assert isinstance(params, CkksParams)
    assert isinstance(encoder, seal.CKKSEncoder) and isinstance(encryptor, seal.Encryptor)
    out = []
    for vector in vectors:
        plain = seal.Plaintext()
        encoder.encode(vector.tolist(), params.scale, plain)
        out.append(save_seeded(encryptor.encrypt_symmetric(plain)))
    return out


def _encrypt_into(vectors: np.ndarray, path: str, first: int, slot: int) -> list[int]:
    """Encrypt ``vectors`` into slots ``first, first + 1, ...`` of a scratch file; their sizes."""
    lengths = []
    with open(path, "r+b") as out:  # buffered: each write is whole
        for k, vector in enumerate(vectors):
            (ciphertext,) = _encrypt(vector[None])  # one at a time: the file holds them
            if len(ciphertext) > slot:
                raise ValueError(
                    f"a ciphertext of {len(ciphertext)} bytes exceeds its {slot}-byte slot"
                )
            out.seek((first + k) * slot)
            out.write(ciphertext)
            lengths.append(len(ciphertext))
    return lengths
