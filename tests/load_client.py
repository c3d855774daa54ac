"""Load-test machinery: the served process, shared keys, client workers, memory, the summary.

``tests/test_load.py`` drives it; it can also run by hand against a fresh server::

    python -m tests.load_client --seconds 30 --threads 8 [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients import (
    BadRequestError,
    ContextNotFoundError,
    HEClient,
    HEClientError,
    KeySet,
    ModelNotFoundError,
    ModelSession,
)
from clients.cli import SAMPLES_DIR, _free_port, load_sample
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import ModelCard, encode_frames, preprocess
from tests.front_attack import SlowSockets

BREAST, MNIST = "breast-cancer-mlp", "mnist-cnn"
# Samples whose plaintext top-two logits are closer than this are left out: CKKS noise (about
# 0.03 on a logit) could flip them, and a flip there is not a server fault.
MIN_MARGIN = 0.2
RSS_INTERVAL = 0.5

# ------------------------------------------------------------------------------ the server


@dataclass
class ServedProcess:
    """``he-service serve`` on a loopback port, its output in a log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    workers: int

    def pids(self) -> list[int]:
        """Return the server process and all its descendants (gunicorn workers)."""
        return process_tree(self.process.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def server_errors(self) -> list[str]:
        """Return log lines that report an unhandled error or a traceback."""
        pattern = re.compile(
            r'Traceback|unhandled error|"level": "(ERROR|CRITICAL)"|\[(ERROR|CRITICAL)\]'
        )
        return [line for line in self.log_text().splitlines() if pattern.search(line)]

    def stop(self, timeout: float = 30) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "he_service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr


def supports_workers() -> bool:
    """Tell whether ``he-service serve`` takes ``--workers`` (gunicorn) on this checkout."""
    return "--workers" in serve_help()


def shipped_subset(directory: Path, names: Iterable[str]) -> Path:
    """Return a models folder in ``directory`` that links only these shipped models.

    A server compiles every model it serves before it answers (the five shipped ones take
    about 25 s); a test that needs two need not wait for the rest.
    """
    folder = directory / "models"
    folder.mkdir(exist_ok=True)
    for name in names:
        link = folder / name
        if not link.exists():
            link.symlink_to(DEFAULT_MODELS_DIR / name, target_is_directory=True)
    return folder


def start_server(
    directory: Path,
    *,
    workers: int | None,
    env: dict[str, str] | None = None,
    models: Iterable[str] = (BREAST, MNIST),
) -> ServedProcess:
    """Start ``python -m he_service.cli serve`` on a free port and wait until it has settled.

    It serves the shipped ``models`` only (the load mix needs no others). Healthy means one
    worker answers; the others may still be compiling their models, so the server counts as
    started once its process tree's memory has stopped growing too.
    """
    port = _free_port()
    log = directory / "server.log"
    environ = {
        **os.environ,
        "HE_SERVICE_MODELS_DIR": str(shipped_subset(directory, models)),
        "HE_SERVICE_KEY_STORE_DIR": str(directory / "contexts"),
        "HE_SERVICE_API_TOKENS": "",  # the tokenless quick start: no quotas either
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "he_service.cli", "serve", "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environ)
    server = ServedProcess(process, f"http://127.0.0.1:{port}", log, workers or 1)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"he-service serve exited early:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                _wait_until_settled(process.pid, deadline)
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy in 180 s:\n{server.log_text()[-3000:]}")
        time.sleep(0.2)


def _wait_until_settled(pid: int, deadline: float) -> None:
    """Wait until the RSS of ``pid``'s process tree moves by less than 1% in two seconds."""
    before = sum(rss_bytes(p) for p in process_tree(pid))
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = sum(rss_bytes(p) for p in process_tree(pid))
        if abs(now - before) <= 0.01 * before:
            return
        before = now


# ------------------------------------------------------------------------------- memory


def process_tree(root: int) -> list[int]:
    """Return ``root`` and every live descendant, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children[parent].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int:
    """Return VmRSS of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Sample the RSS of a process tree every ``interval`` seconds in a background thread."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = RSS_INTERVAL) -> None:
        self._pids, self._interval = pids, interval
        self.samples: list[tuple[float, int, int]] = []  # (seconds, total bytes, processes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = 0.0
        self.run_start = 0.0  # seconds after the start when the measured run began

    def mark_run_start(self) -> None:
        self.run_start = time.monotonic() - self._start

    def _run(self) -> None:
        while True:
            pids = self._pids()
            total = sum(rss_bytes(pid) for pid in pids)
            self.samples.append((time.monotonic() - self._start, total, len(pids)))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> RssSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((total for _, total, _ in self.samples), default=0)

    def thirds(self) -> tuple[float, float]:
        """Return the median RSS of the first and of the last third of the measured run."""
        totals = [total for t, total, _ in self.samples if t >= self.run_start]
        third = max(1, len(totals) // 3)
        return statistics.median(totals[:third]), statistics.median(totals[-third:])


# -------------------------------------------------------------------------------- the load


@dataclass
class Samples:
    """Raw samples of one model and the class the plaintext network gives each."""

    raw: np.ndarray
    expected: np.ndarray


def _plain_classes(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    artifact = load_artifact(DEFAULT_MODELS_DIR / name)
    logits = np.stack(
        [
            forward_plain(artifact, preprocess(x, artifact.preprocessing, artifact.input_shape))
            for x in raw
        ]
    )
    ordered = np.sort(logits, axis=1)
    return logits.argmax(axis=1), ordered[:, -1] - ordered[:, -2]


def load_samples() -> dict[str, Samples]:
    """Breast-cancer held-out rows and the shipped MNIST sample digits, clear decisions only."""
    from models.datasets import load_breast_cancer_split

    found = {
        BREAST: np.asarray(load_breast_cancer_split(0).x_test, dtype=np.float64),
        MNIST: np.stack([load_sample(p, (1, 28, 28)) for p in sorted(SAMPLES_DIR.glob("*.png"))]),
    }
    samples = {}
    for name, raw in found.items():
        expected, margin = _plain_classes(name, raw)
        clear = margin >= MIN_MARGIN
        samples[name] = Samples(raw[clear], expected[clear])
    return samples


@dataclass
class Workload:
    """What every worker shares: the cards, one key set per (model, plan), the samples."""

    cards: dict[str, ModelCard]
    keys: dict[tuple[str, str], KeySet]
    samples: dict[str, Samples]
    batch_rows: tuple[int, int] = (24, 48)

    @classmethod
    def prepare(cls, url: str) -> Workload:
        """Fetch the cards and generate the keys once (seconds): workers only reuse them."""
        with HEClient(url) as client:
            cards = {name: client.card(name) for name in (BREAST, MNIST)}
        keys = {}
        for name, plan in ((BREAST, "latency"), (BREAST, "batch"), (MNIST, "latency")):
            spec = cards[name].plan(plan)
            keys[(name, plan)] = KeySet.generate(spec.ckks, spec.galois_steps)
        return cls(cards, keys, load_samples())


class Expected(Exception):
    """An operation got the error it provoked (a 4xx of the right class)."""


class Unexpected(Exception):
    """An operation got a wrong answer, or an error it did not provoke."""


@dataclass
class Stats:
    """Per kind of operation: latencies and outcomes; thread-safe."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.seconds[kind].append(seconds)
            self.outcomes[kind][outcome] += 1
            if outcome.startswith("unexpected"):
                self.unexpected.append(f"{kind}: {detail}")

    def reset(self) -> None:
        """Forget the warm-up, but keep its unexpected outcomes: they count too."""
        with self.lock:
            self.seconds.clear()
            self.outcomes.clear()
            if self.unexpected:
                self.outcomes["warm-up"]["unexpected"] = len(self.unexpected)

    def count(self, prefix: str) -> int:
        return sum(
            n
            for counts in self.outcomes.values()
            for o, n in counts.items()
            if o.startswith(prefix)
        )


@dataclass
class HttpLog:
    """Every HTTP request the workers made: (method, route, status, seconds); thread-safe."""

    requests: list[tuple[str, str, int, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, status: int, seconds: float) -> None:
        route = re.sub(r"/v1/contexts/[^/]+", "/v1/contexts/{id}", path)
        route = re.sub(r"/v1/models/[^/]+", "/v1/models/{name}", route)
        with self.lock:
            self.requests.append((method, route, status, seconds))


class CountingTransport(httpx.HTTPTransport):
    """An HTTP transport that logs each request's route, status and duration."""

    def __init__(self, log: HttpLog) -> None:
        super().__init__()
        self._log = log

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        try:
            response = super().handle_request(request)
        except httpx.HTTPError:
            self._log.add(request.method, request.url.path, 0, time.perf_counter() - start)
            raise
        response.read()
        self._log.add(
            request.method, request.url.path, response.status_code, time.perf_counter() - start
        )
        return response


# Kinds of operation and their weights in the mix.
MIX = {
    "latency breast-cancer-mlp": 4.0,
    "latency mnist-cnn": 3.0,
    "batch breast-cancer-mlp": 1.0,
    "upload known keys": 1.0,
    "upload new keys": 0.4,
    "bad: garbage context": 0.4,
    "bad: unknown context": 0.4,
    "bad: wrong ciphertext count": 0.4,
    "bad: garbage ciphertexts": 0.4,
    "bad: unknown model": 0.3,
}


class Worker:
    """One client thread: its own HEClient, the shared keys, a seeded random mix of calls."""

    def __init__(
        self, url: str, workload: Workload, stats: Stats, http: HttpLog, seed: int
    ) -> None:
        self.workload, self.stats, self.rng = workload, stats, random.Random(seed)
        self.client = HEClient(url, timeout=300, transport=CountingTransport(http))
        self.sessions: dict[tuple[str, str], ModelSession] = {}

    def session(self, name: str, plan: str) -> ModelSession:
        if (name, plan) not in self.sessions:
            keys = self.workload.keys[(name, plan)]
            self.sessions[(name, plan)] = self.client.model(name, plan=plan, keys=keys)
        return self.sessions[(name, plan)]

    def warm_up(self) -> None:
        """Open every session (card, HEAD, upload if missing) and predict once with each."""
        for kind in ("latency breast-cancer-mlp", "latency mnist-cnn", "batch breast-cancer-mlp"):
            self._timed(f"warm-up {kind}", kind)

    def _timed(self, label: str, kind: str) -> None:
        start = time.perf_counter()
        try:
            self.operation(kind)
        except Expected as exc:
            self.stats.record(label, time.perf_counter() - start, f"expected {exc}")
        except Unexpected as exc:
            self.stats.record(label, time.perf_counter() - start, "unexpected", str(exc))
        except Exception as exc:  # anything else is unexpected too, and recorded
            detail = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.stats.record(label, time.perf_counter() - start, "unexpected", detail)
        else:
            self.stats.record(label, time.perf_counter() - start, "ok")

    def run(self, deadline: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        with self.client:
            while time.monotonic() < deadline:
                kind = self.rng.choices(kinds, weights)[0]
                self._timed(kind, kind)

    def _pick(self, name: str) -> tuple[np.ndarray, int]:
        samples = self.workload.samples[name]
        index = self.rng.randrange(len(samples.raw))
        return samples.raw[index], int(samples.expected[index])

    def operation(self, kind: str) -> None:
        if kind.startswith("latency "):
            name = kind.split()[1]
            x, expected = self._pick(name)
            got = int(np.argmax(self.session(name, "latency").predict(x)))
            if got != expected:
                raise Unexpected(f"{name}: class {got}, the plaintext network says {expected}")
        elif kind == "batch breast-cancer-mlp":
            samples = self.workload.samples[BREAST]
            rows = self.rng.sample(
                range(len(samples.raw)), self.rng.randint(*self.workload.batch_rows)
            )
            logits = self.session(BREAST, "batch").predict_many(samples.raw[rows])
            wrong = int(np.sum(logits.argmax(axis=1) != samples.expected[rows]))
            if wrong:
                raise Unexpected(f"batch: {wrong} of {len(rows)} rows classified differently")
        elif kind == "upload known keys":
            keys = self.workload.keys[self.rng.choice(list(self.workload.keys))]
            context_id = self.client.upload_context(keys.public_context)
            if context_id != hashlib.sha256(keys.public_context).hexdigest():
                raise Unexpected(f"context id {context_id} is not the sha256 of the upload")
        elif kind == "upload new keys":  # small: batch-plan parameters, relinearization keys only
            spec = self.workload.cards[BREAST].plan("batch")
            keys = KeySet.generate(spec.ckks, ())
            context_id = self.client.upload_context(keys.public_context)
            if not self.client.has_context(context_id):
                raise Unexpected("a context just uploaded is not stored")
            if self.rng.random() < 0.5:
                self.client.delete_context(context_id)
        elif kind == "bad: garbage context":
            body = self.rng.randbytes(self.rng.randint(1, 4096))
            self._expect(BadRequestError, self.client.upload_context, body)
        elif kind == "bad: unknown context":
            x, _ = self._pick(BREAST)
            ciphertexts = self.session(BREAST, "latency").encrypt(x)
            unknown = self.rng.randbytes(32).hex()
            self._expect(
                ContextNotFoundError, self.client.predict_raw, BREAST, unknown, ciphertexts
            )
        elif kind == "bad: wrong ciphertext count":
            session = self.session(MNIST, "latency")
            x, _ = self._pick(MNIST)
            ciphertexts = session.encrypt(x)[: self.rng.randint(1, 3)]
            self._expect(
                BadRequestError, self.client.predict_raw, MNIST, session.context_id, ciphertexts
            )
        elif kind == "bad: garbage ciphertexts":
            session = self.session(BREAST, "latency")
            frames = [self.rng.randbytes(self.rng.randint(16, 4096))]
            self._expect(BadRequestError, self._post_raw, session.context_id, encode_frames(frames))
        elif kind == "bad: unknown model":
            self._expect(ModelNotFoundError, self.client.card, f"no-such-model-{self.rng.random()}")
        else:  # pragma: no cover
            raise AssertionError(kind)

    def _post_raw(self, context_id: str, body: bytes) -> None:
        self.client._request(  # the SDK frames valid ciphertexts only; this sends junk
            "POST",
            f"/v1/models/{BREAST}/predict",
            content=body,
            headers={"X-Context-Id": context_id},
        )

    @staticmethod
    def _expect(error: type[HEClientError], call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except error as exc:
            raise Expected(getattr(exc, "status", type(exc).__name__)) from None
        except HEClientError as exc:
            raise Unexpected(f"wanted {error.__name__}, got {type(exc).__name__}: {exc}") from None
        raise Unexpected(f"wanted {error.__name__}, the call succeeded")


# ------------------------------------------------------------------------------ the report


@dataclass
class LoadReport:
    seconds: float
    threads: int
    workers: int
    stats: Stats
    http: HttpLog
    rss: RssSampler
    server_errors: list[str]
    warm_up_requests: int
    kills: int = 0  # workers killed by the faults mode

    @property
    def requests(self) -> int:
        return len(self.http.requests)

    @property
    def unexpected(self) -> int:
        return self.stats.count("unexpected") + len(self.server_errors)

    def rss_growth(self) -> tuple[float, float]:
        """Return (bytes, fraction) from the first third's median RSS to the last third's."""
        first, last = self.rss.thirds()
        return last - first, (last - first) / first if first else 0.0

    def table(self) -> str:
        mib = 1 << 20
        lines = [
            f"load: {self.seconds:.0f} s, {self.threads} client threads, "
            f"server with {self.workers} worker process(es), after a warm-up of "
            f"{self.warm_up_requests} requests",
            f"{'operation':<28} {'count':>6} {'ok':>6} {'4xx':>5} {'bad':>4} "
            f"{'p50 ms':>8} {'p99 ms':>8}",
        ]
        for kind in MIX:
            seconds = self.stats.seconds.get(kind, [])
            outcomes = self.stats.outcomes.get(kind, Counter())
            expected = sum(n for o, n in outcomes.items() if o.startswith("expected"))
            p50, p99 = percentiles(seconds)
            lines.append(
                f"{kind:<28} {len(seconds):>6} {outcomes['ok']:>6} {expected:>5} "
                f"{outcomes['unexpected']:>4} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f}"
            )
        statuses = Counter(status for _, _, status, _ in self.http.requests)
        by_route = Counter(f"{m} {r} {s}" for m, r, s, _ in self.http.requests)
        first, last = self.rss.thirds()
        growth, fraction = self.rss_growth()
        lines += [
            f"HTTP requests: {self.requests} ({self.requests / self.seconds:.1f}/s); "
            f"by status: {dict(sorted(statuses.items()))}",
            "  " + "; ".join(f"{k}: {n}" for k, n in sorted(by_route.items())),
            f"errors by kind: {self._errors_by_kind()}",
            f"unexpected: {self.stats.count('unexpected')} client-side, "
            f"{len(self.server_errors)} server log lines; workers killed: {self.kills}",
            f"server RSS (sum over {max(n for _, _, n in self.rss.samples)} process(es), "
            f"{len(self.rss.samples)} samples): peak {self.rss.peak / mib:.0f} MiB; "
            f"first third {first / mib:.0f} MiB, last third {last / mib:.0f} MiB, "
            f"growth {growth / mib:+.0f} MiB ({fraction:+.1%})",
        ]
        lines += [f"  unexpected: {line}" for line in self.stats.unexpected[:20]]
        lines += [f"  server log: {line[:300]}" for line in self.server_errors[:20]]
        return "\n".join(lines)

    def _errors_by_kind(self) -> str:
        errors: Counter[str] = Counter()
        for kind, outcomes in self.stats.outcomes.items():
            for outcome, n in outcomes.items():
                if outcome != "ok":
                    errors[f"{kind} -> {outcome}"] += n
        return ", ".join(f"{k}: {n}" for k, n in sorted(errors.items())) or "none"


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    ordered = np.asarray(values)
    return float(np.percentile(ordered, 50)), float(np.percentile(ordered, 99))


class WorkerKills:
    """A fault for a load run: SIGKILL one gunicorn worker every ``every`` seconds.

    Only while every worker is up and older than ``min_age`` (a new worker compiles its models
    first), so one worker always serves; the SDK's retries must carry the calls the kill drops.
    """

    def __init__(self, server: ServedProcess, every: float = 15.0, min_age: float = 10.0) -> None:
        self.server, self.every, self.min_age = server, every, min_age
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-kills", daemon=True)

    def _workers(self) -> list[int]:
        return [p for p in self.server.pids() if p != self.server.process.pid]

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            workers = self._workers()
            settled = min(map(process_age, workers), default=0.0) > self.min_age
            if len(workers) == self.server.workers and settled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(random.choice(workers), signal.SIGKILL)
                    self.kills += 1

    def __enter__(self) -> WorkerKills:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def process_age(pid: int) -> float:
    """Return the seconds since process ``pid`` started (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def run_load(
    server: ServedProcess,
    workload: Workload,
    *,
    seconds: float,
    threads: int,
    seed: int = 0,
    faults: bool = False,
) -> LoadReport:
    """Run ``threads`` workers against the server for ``seconds``; sample its memory meanwhile.

    With ``faults``, the run also keeps 50 slow connections trickling (``SlowSockets``) and,
    with several workers, kills one with SIGKILL every 15 s (``WorkerKills``).
    """
    stats, http = Stats(), HttpLog()
    workers = [Worker(server.url, workload, stats, http, seed + i) for i in range(threads)]
    with RssSampler(server.pids) as rss:
        # Warm-up: every worker opens its sessions (the server loads the keys into memory)
        # and predicts once per plan, so the measured run starts from a warm server.
        warm = [threading.Thread(target=w.warm_up, name=f"warm-{i}") for i, w in enumerate(workers)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        warm_requests = len(http.requests)
        stats.reset()
        http.requests.clear()
        rss.mark_run_start()
        deadline = time.monotonic() + seconds
        pool = [
            threading.Thread(target=w.run, args=(deadline,), name=f"load-{i}")
            for i, w in enumerate(workers)
        ]
        start = time.monotonic()
        with contextlib.ExitStack() as stack:
            kills = None
            if faults:
                port = int(server.url.rsplit(":", 1)[1])
                stack.enter_context(SlowSockets(port, 50))
                if server.workers > 1:
                    kills = stack.enter_context(WorkerKills(server))
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
        elapsed = time.monotonic() - start
    if server.process.poll() is not None:
        stats.record("server", 0.0, "unexpected", f"server exited with {server.process.returncode}")
    errors = server.server_errors()
    if faults:  # gunicorn reports each kill as an error line; nothing else may be one
        errors = [line for line in errors if "SIGKILL" not in line]
    return LoadReport(
        elapsed,
        threads,
        server.workers,
        stats,
        http,
        rss,
        errors,
        warm_requests,
        kills.kills if kills is not None else 0,
    )


@contextmanager
def served(
    directory: Path, *, workers: int | None, env: dict[str, str] | None = None
) -> Iterator[ServedProcess]:
    server = start_server(directory, workers=workers, env=env)
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--faults", action="store_true", help="slow sockets and worker kills")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="he-load-") as tmp,
        served(Path(tmp), workers=args.workers) as server,
    ):
        report = run_load(
            server,
            Workload.prepare(server.url),
            seconds=args.seconds,
            threads=args.threads,
            faults=args.faults,
        )
        print(report.table())
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
