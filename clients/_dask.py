"""Encrypt and decrypt on a Dask cluster, for files one machine cannot encrypt in time.

Imported only when a run asks for a cluster (``dask=`` / ``--dask``): ``clients`` itself does
not need Dask. The secret key goes to the cluster once, as a worker plugin (``_KeyPlugin``)
that the scheduler hands to every worker, present and future (a restarted worker gets it too);
each worker loads it once and keeps it under the plugin's name, which holds the hash of the
public context. Tasks carry only that name, slot vectors and output ciphertexts. At the end of
the run the plugin is removed and the workers forget the key.

Whoever runs the scheduler or a worker can read the secret key: the cluster must be the key
owner's own, reached over TLS (``tls://`` with ``distributed.security.Security``) when it is
not on this machine.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from distributed import Client, Future, get_worker
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from clients._crypto import KeySet
from clients._errors import DaskClusterError, HEClientError
from clients._pipeline import _add, _chunks, _encrypt, _load_key, _Results, _state
from clients._release import release
from he_service.protocol import CkksParams, load_seal, save_seal, seal_context
from he_service.protocol.card import OutputDecoding

__all__ = ["DEFAULT_PORT", "DaskBackend", "connect", "plain_remote"]

DEFAULT_PORT = 8786
# How long a run waits for a cluster that has lost every worker before it gives up: long
# enough for a worker's nanny to restart it, short enough that a dead cluster is not a hang.
NO_WORKERS_SECONDS = 60.0
# How often a wait looks at the cluster.
_POLL_SECONDS = 1.0
# How long closing a run may wait for the cluster to drop its tasks and its key.
_CLOSE_SECONDS = 10.0
# A task carries its vectors (so a task lost with its worker runs again elsewhere): at most
# this many bytes each, below Dask's warning about large graphs (10 MB); a batch group of
# MNIST is 784 vectors of 4096 slots, 26 MB.
_CHUNK_BYTES = 8 << 20
# Decrypting an answer goes before encrypting later groups: the pipeline waits on it.
_RELEASE_PRIORITY = 10

# One encryption at a time per worker process: ``_state`` holds one key's objects, and SEAL
# holds the GIL anyway, so a worker's threads would not encrypt faster in parallel.
_LOCK = threading.Lock()


def connect(address: str, *, timeout: float = 10.0) -> Client:
    """Connect to a Dask scheduler that has at least one worker.

    Args:
        address: ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (port 8786 when left out). TLS
            credentials come from Dask's configuration (``distributed.comm.tls.*``, e.g. the
            ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` environment variable); pass a
            ``distributed.Client`` made with a ``Security`` to the SDK instead to set them in code.
        timeout: seconds to wait for the scheduler, and then for a worker.

    Raises:
        DaskClusterError: the address is malformed, nothing answers there, or the scheduler
            has no workers within ``timeout``.
    """
    hint = "start one with `dask scheduler` and pass its address, e.g. tcp://HOST:8786"
    try:
        scheme, location = parse_address(address, strict=False)
        host, port = parse_host_port(location, default_port=DEFAULT_PORT)
    except ValueError as exc:
        raise DaskClusterError(
            f"{address!r} is not a Dask scheduler address ({exc}); {hint}"
        ) from None
    if scheme in ("tcp", "tls"):
        # Dask retries a refused connection until its timeout; a plain probe fails at once.
        try:
            socket.create_connection((host, port), timeout=min(timeout, 5.0)).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DaskClusterError(
                f"cannot reach the Dask scheduler at {address}: {reason}; {hint}"
            ) from None
    if scheme == "tls" and Security().get_connection_args("client").get("ssl_context") is None:
        raise DaskClusterError(
            f"{address} needs TLS credentials: set DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (or distributed.comm.tls.* in Dask's "
            "configuration)"
        )
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except Exception as exc:
        _abandon(exc)
        raise DaskClusterError(
            f"cannot connect to the Dask scheduler at {address}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        client.close()
        raise DaskClusterError(
            f"the Dask scheduler at {address} has no workers after {timeout:g} s: start some "
            f"with `dask worker {address} --nworkers N --nthreads 1`"
        ) from None
    return client


def _abandon(error: BaseException) -> None:
    """Mark the half-made ``Client`` of a failed connection closed.

    Otherwise its finalizer tries to close the connection that never opened, waits twice the
    timeout and prints a traceback, long after the one-line error was shown.
    """
    trace = error.__traceback__
    while trace is not None:
        candidate = trace.tb_frame.f_locals.get("self")
        if isinstance(candidate, Client):
            candidate.status = "closed"
            return
        trace = trace.tb_next


def plain_remote(address: str) -> bool:
    """Tell whether ``address`` is an unencrypted connection to another machine."""
    try:
        scheme, location = parse_address(address, strict=False)
        host, _ = parse_host_port(location, default_port=DEFAULT_PORT)
    except ValueError:
        return False
    if scheme != "tcp":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


class DaskBackend:
    """The pipeline's backend on a Dask cluster: workers encrypt chunks and release answers."""

    def __init__(self, session: Any, dask: str | Client, *, chunks: int | None = None) -> None:
        """Connect (unless given a client) and hand the secret key to every worker, once.

        Args:
            session: the ``ModelSession`` whose keys and plan are used.
            dask: a scheduler address, or a connected ``distributed.Client`` (left open).
            chunks: chunks each group's vectors are split into (default: the cluster's
                threads when the run starts).
        """
        self._owned = isinstance(dask, str)
        self._client = connect(dask) if isinstance(dask, str) else dask
        self._address = str(getattr(self._client.scheduler, "address", None) or "?")
        self._spec = session.spec
        self._futures: set[Future[Any]] = set()
        # A fresh suffix per run: two runs with the same keys must not remove each other's.
        self._name = f"he-client-key-{session.context_id[:16]}-{secrets.token_hex(4)}"
        try:
            self._chunks = chunks or max(1, sum(self._client.nthreads().values()))
            plugin = _KeyPlugin(self._name, session.keys.params, save_seal(session.keys.secret_key))
            self._client.register_plugin(plugin, name=self._name)
        except Exception as exc:
            self.close()  # the scheduler keeps a plugin even when a worker refused it
            raise DaskClusterError(
                f"could not hand the key to the Dask cluster at {self._address}: "
                f"{type(exc).__name__}: {exc} (is he-inference[dask], this version, installed "
                "on every worker?)"
            ) from None

    def encrypt(self, vectors: np.ndarray) -> _Results:
        """Start encrypting ``vectors`` on the workers, in order, in up to ``chunks`` tasks."""
        return _Results(
            [
                _Watched(self, self._submit(_encrypt_task, self._name, chunk))
                for chunk in _chunks(vectors, max(self._chunks, -(-vectors.nbytes // _CHUNK_BYTES)))
            ]
        )

    def release(self, outputs: list[bytes], samples: int, timings: dict[str, float]) -> np.ndarray:
        """Decrypt and release a group's answer on a worker, as ``ModelSession`` does here."""
        start = time.perf_counter()
        spec = self._spec
        future = self._submit(
            _release_task,
            self._name,
            outputs,
            spec.output_decoding,
            samples,
            spec.output_precision,
            priority=_RELEASE_PRIORITY,
        )
        released: np.ndarray = _Watched(self, future).result()
        _add(timings, "decrypt", time.perf_counter() - start)
        return released

    def close(self) -> None:
        """Drop pending tasks, remove the key from the cluster, disconnect if we connected.

        Bounded in time: a cluster that is gone (or an interpreter shutting down) holds no
        key to remove, and must not keep the run from ending.
        """
        pending, self._futures = list(self._futures), set()
        try:
            if pending:
                self._client.sync(self._client._cancel, pending, callback_timeout=_CLOSE_SECONDS)
            self._client.sync(
                self._client._unregister_worker_plugin, self._name, callback_timeout=_CLOSE_SECONDS
            )
        except Exception:  # noqa: S110 - see above
            pass
        finally:
            self._close_client()

    def wait(self, future: Future[Any]) -> Any:
        """Return a task's result; raise ``DaskClusterError`` if it failed or no worker is left."""
        alone_since: float | None = None
        try:
            while True:
                try:
                    return future.result(timeout=_POLL_SECONDS)
                except TimeoutError:
                    pass
                if self._client.nthreads():
                    alone_since = None
                    continue
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > NO_WORKERS_SECONDS:
                    raise DaskClusterError(
                        f"the Dask cluster at {self._address} has had no workers for "
                        f"{NO_WORKERS_SECONDS:g} s; start workers and run again (groups "
                        "already scored are kept)"
                    )
        except (HEClientError, ValueError):
            raise  # the SDK's own errors, raised on a worker (a malformed answer, say)
        except Exception as exc:
            raise DaskClusterError(
                f"the Dask cluster at {self._address} failed: {type(exc).__name__}: {exc} "
                "(groups already scored are kept)"
            ) from exc
        finally:
            self._futures.discard(future)

    def _submit(self, function: Any, *args: Any, priority: int = 0) -> Future[Any]:
        # Not pure: equal vectors must still get fresh encryptions, and no task is shared.
        future = self._client.submit(function, *args, pure=False, priority=priority)
        self._futures.add(future)
        return future

    def _close_client(self) -> None:
        if self._owned:
            self._client.close(timeout=_CLOSE_SECONDS)


class _Watched:
    """A Dask future whose ``result`` gives up when the cluster fails or loses every worker."""

    def __init__(self, backend: DaskBackend, future: Future[Any]) -> None:
        self._backend, self._future = backend, future

    def result(self) -> Any:
        return self._backend.wait(self._future)


class _KeyPlugin(WorkerPlugin):
    """The secret key on a worker: loaded once when the worker gets the plugin."""

    def __init__(self, name: str, params: CkksParams, secret: bytes) -> None:
        self.name, self.params, self._secret = name, params, secret
        self.keys: KeySet | None = None

    def setup(self, worker: Any) -> None:
        key = load_seal(seal.SecretKey, self._secret, seal_context(self.params), what="secret key")
        self.keys = KeySet(self.params, (), key, b"")  # decrypts only: no public keys needed
        with _LOCK:
            self._load()

    def teardown(self, worker: Any) -> None:
        self.keys = None
        with _LOCK:
            if _state.get("key") == self.name:
                _state.clear()

    def _load(self) -> None:
        """Make this key the one ``_encrypt`` uses in this process (caller holds ``_LOCK``)."""
        if _state.get("key") != self.name:
            _load_key(self.params, self._secret)
            _state["key"] = self.name


def _plugin(name: str) -> _KeyPlugin:
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, _KeyPlugin):
        raise RuntimeError(f"this worker has no key {name!r}: the run that sent it has ended")
    return plugin


def _encrypt_task(name: str, vectors: np.ndarray) -> list[bytes]:
    """On a worker: encrypt slot vectors with the run's key, as the local pool does."""
    plugin = _plugin(name)
    with _LOCK:
        plugin._load()
        return _encrypt(vectors)


def _release_task(
    name: str, outputs: list[bytes], decoding: OutputDecoding, samples: int, step: float
) -> np.ndarray:
    """On a worker: decrypt and release output ciphertexts with the run's key."""
    keys = _plugin(name).keys
    if keys is None:
        raise RuntimeError(f"the key {name!r} was removed from this worker")
    return release(keys, outputs, decoding, samples, step)
