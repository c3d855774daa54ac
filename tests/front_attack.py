"""Hostile clients against a running `he-service serve`: slow sockets, huge bodies, random requests.

Used by tests/test_slow_clients.py (small counts) and by hand for the numbers of issue 11:

    python -m tests.front_attack --workers 2 --slow 200 --fuzz 10000

starts the server on a free loopback port with the breast-cancer-mlp model only and prints the
predictions' p99 without and with the slow sockets, the bytes a 400 MiB body gets in before it
is refused, and the outcome of the random requests (dropped connections, 5xx).
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from clients.cli import _free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "breast-cancer-mlp"  # the fastest shipped model
TOKEN = "front-attack-token-0123456789abcdef"


def token_entry() -> str:
    from he_service.auth import hash_token

    return f"tester:{hash_token(TOKEN)}"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path


@contextmanager
def serve(workdir: Path, workers: int, *extra: str) -> Iterator[Served]:
    """Run `he-service serve` with only MODEL and an API token; stop it on exit."""
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    link = models / MODEL
    if not link.exists():
        link.symlink_to(ROOT / "models" / "artifacts" / MODEL)
    port = _free_port()
    log = workdir / f"serve-{workers}-{port}.log"
    env = {
        **os.environ,
        "HE_SERVICE_KEY_STORE_DIR": str(workdir / "contexts"),
        "HE_SERVICE_API_TOKENS": token_entry(),
        "HE_SERVICE_RATE_LIMIT_PER_MINUTE": "1000000",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        *(sys.executable, "-m", "he_service.cli", "serve", "--models-dir", str(models)),
        *("--port", str(port), "--workers", str(workers), "--threads", "2", *extra),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    served = Served(process, f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{served.url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        if workers > 1:  # every worker has loaded its models once all answer
            _settle(served.url, workers)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _settle(url: str, workers: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with httpx.Client(timeout=5) as client:
            if all(client.get(f"{url}/v1/health").status_code == 200 for _ in range(4 * workers)):
                return
        time.sleep(0.2)


# --- slow sockets --------------------------------------------------------------------------


@dataclass
class SlowSockets:
    """Keep ``count`` connections open that trickle headers or a body, reconnecting when closed.

    One thread drives every socket (non-blocking), one byte per socket every ``interval``
    seconds; half of them trickle a request's headers, half send complete headers of a
    100 KB predict and then trickle its body.
    """

    port: int
    count: int
    interval: float = 0.5
    connections: int = 0  # opened in all
    closed_by_server: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _open(self, index: int) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        self.connections += 1
        if index % 2:
            return sock, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        head = (
            f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\nX-Context-Id: {'0' * 64}\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        try:
            sock.send(head)
        except OSError:
            pass
        return sock, b"\0" * 100_000

    def _run(self) -> None:
        pending = [self._open(i) for i in range(self.count)]
        while not self._stop.is_set():
            for i, (sock, rest) in enumerate(pending):
                try:
                    sock.send(rest[:1])
                    pending[i] = (sock, rest[1:] or rest)
                    if sock.recv(4096, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    self.closed_by_server += 1
                    sock.close()
                    try:
                        pending[i] = self._open(i)
                    except OSError:
                        pass
            self._stop.wait(self.interval)
        for sock, _ in pending:
            sock.close()

    def __enter__(self) -> SlowSockets:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.connections < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def p99(seconds: list[float]) -> float:
    return float(np.percentile(seconds, 99))


# --- huge bodies ---------------------------------------------------------------------------


def push_body(port: int, head: bytes, total: int, *, chunked: bool = False) -> tuple[int, bytes]:
    """Send ``head`` then up to ``total`` body bytes; return bytes the socket took and the answer.

    Stops at the first send error or when the server answered and nothing more goes in for a
    second (the server stopped reading).
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    sock.setblocking(False)
    piece = b"\0" * (1 << 16)
    if chunked:
        piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
    accepted, answer = 0, b""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + 30
    stalled_since: float | None = None
    try:
        while accepted < total and time.monotonic() < deadline:
            events = selector.select(timeout=0.2)
            if not events:
                if answer and stalled_since is not None and time.monotonic() - stalled_since > 1:
                    break
                continue
            for _, mask in events:
                if mask & selectors.EVENT_READ:
                    data = sock.recv(65536)
                    if not data:
                        return accepted, answer
                    answer += data
                    stalled_since = stalled_since or time.monotonic()
                if mask & selectors.EVENT_WRITE:
                    accepted += sock.send(piece)
    except OSError:
        pass
    finally:
        sock.setblocking(True)
        sock.settimeout(2)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
        selector.close()
        sock.close()
    return accepted, answer


# --- random requests -----------------------------------------------------------------------

_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]
_PATHS = [
    "/v1/health",
    "/v1/models",
    f"/v1/models/{MODEL}",
    "/v1/models/nope",
    f"/v1/models/{MODEL}/predict",
    f"/v1/models/{MODEL}/predict?plan=batch",
    f"/v1/models/{MODEL}/predict?plan=zzz",
    f"/v1/models/{MODEL}/uploads",
    "/v1/contexts",
    "/v1/contexts/" + "a" * 64,
    "/v1/contexts/xyz",
    "/v1/uploads/abc/parts/0",
    "/v1/uploads/abc/predict",
    "/v1/openapi.json",
    "/metrics",
    "/",
    "/v2/health/live",
    "/v1/models/%00",
    "/" + "x" * 3000,
]


def random_requests(url: str, count: int, seed: int = 0) -> Counter[str]:
    """Send ``count`` random requests on one keep-alive client; count statuses and drops."""
    rng = random.Random(seed)
    outcome: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            headers = {}
            roll = rng.random()
            if roll < 0.6:
                headers["Authorization"] = f"Bearer {TOKEN}"
            elif roll < 0.8:
                headers["Authorization"] = "Bearer " + "".join(
                    rng.choices("abcdef0123456789", k=rng.randrange(1, 60))
                )
            if rng.random() < 0.5:
                headers["X-Context-Id"] = rng.choice(["0" * 64, "zz", ""])
            size = rng.choice([0, 0, 1, 100, 5000, 20_000, 70_000, 300_000])
            body = rng.randbytes(size)
            try:
                response = client.request(
                    rng.choice(_METHODS), rng.choice(_PATHS), headers=headers, content=body
                )
            except httpx.TransportError as exc:
                outcome[f"dropped {type(exc).__name__}"] += 1
                continue
            outcome["5xx" if response.status_code >= 500 else str(response.status_code)] += 1
    return outcome


# --- the numbers of issue 11 ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slow", type=int, default=200, help="slow connections")
    parser.add_argument("--predictions", type=int, default=50)
    parser.add_argument("--fuzz", type=int, default=10_000, help="random requests")
    parser.add_argument("--read-timeout", default="5")
    args = parser.parse_args(argv)
    from clients import HEClient

    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(Path(tmp), args.workers, "--read-timeout", args.read_timeout) as served,
    ):
        x = np.zeros(30)
        with HEClient(served.url, token=TOKEN) as client:
            session = client.model(MODEL)
            session.predict(x)

            def timed() -> list[float]:
                seconds = []
                for _ in range(args.predictions):
                    start = time.perf_counter()
                    session.predict(x)
                    seconds.append(time.perf_counter() - start)
                return seconds

            unloaded = timed()
            with SlowSockets(served.port, args.slow) as slow:
                loaded = timed()
            print(
                f"workers={args.workers} slow={args.slow}: {len(loaded)}/{args.predictions} "
                f"predictions ok; p99 unloaded {p99(unloaded) * 1000:.1f} ms, loaded "
                f"{p99(loaded) * 1000:.1f} ms ({p99(loaded) / p99(unloaded):.2f}x); slow "
                f"connections opened {slow.connections}, closed by the server "
                f"{slow.closed_by_server}"
            )
        head = (
            f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {400 << 20}\r\n\r\n"
        ).encode()
        accepted, answer = push_body(served.port, head, 400 << 20)
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
        print(
            f"400 MiB body to a 16 MiB route: {accepted / (1 << 20):.2f} MiB taken by the socket, "
            f"answer {status!r}"
        )
        start = time.perf_counter()
        outcome = random_requests(served.url, args.fuzz)
        dropped = sum(n for key, n in outcome.items() if key.startswith("dropped"))
        print(
            f"{args.fuzz} random requests in {time.perf_counter() - start:.1f} s: "
            f"{dropped} dropped, {outcome['5xx']} 5xx; {dict(sorted(outcome.items()))}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
