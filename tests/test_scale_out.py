"""Two ``he-service serve`` instances behind one Redis: one service, whichever instance answers.

A real redis-server and two real instances on loopback ports (the README's multi-instance
layout without the load balancer, whose part the SDK's list of base URLs plays here). Keys
uploaded on one instance serve predictions on the other, an upload in parts may send its parts
to both, a token's sample budget is one budget across both, and when one instance is killed
(SIGKILL) mid-run, a client that knows both URLs answers every row, correctly, from the other.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients import HEClient, KeySet, RateLimitedError, Retry, cli
from clients._release import release
from he_service.artifacts import load_artifact
from he_service.auth import hash_token
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import compile_model
from he_service.protocol import PlanKind, preprocess
from tests.load_client import BREAST, ServedProcess, load_samples, start_server
from tests.redis_server import RedisServer

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
ROWS_PER_REQUEST = 4
REQUESTS = 12
KILL_AFTER = 4  # requests answered by the first instance before it is killed
RETRY = Retry(attempts=6, deadline=60.0, backoff=0.2)


@pytest.fixture(scope="module")
def group() -> int:
    """The samples in one batch group of the model: what one batch request charges."""
    return compile_model(load_artifact(DEFAULT_MODELS_DIR / BREAST)).batch.slot_count


@pytest.fixture(scope="module")
def budget(group: int) -> int:
    # Room for alice's batch group and stream, and for two of bob's groups but not three.
    return 2 * group + ROWS_PER_REQUEST * REQUESTS + 16


@pytest.fixture(scope="module")
def instances(
    tmp_path_factory: pytest.TempPathFactory, budget: int
) -> Iterator[tuple[ServedProcess, ServedProcess]]:
    redis = RedisServer().start()
    env = {
        "HE_SERVICE_REDIS_URL": redis.url,
        "HE_SERVICE_API_TOKENS": ",".join(f"{n}:{hash_token(t)}" for n, t in TOKENS.items()),
        "HE_SERVICE_SAMPLE_BUDGET": str(budget),
    }
    folders = [tmp_path_factory.mktemp(name) for name in ("instance-a", "instance-b")]
    with ThreadPoolExecutor(2) as pool:  # each compiles its models: start them side by side
        starting = [
            pool.submit(start_server, folder, workers=None, env=env, models=[BREAST])
            for folder in folders
        ]
    try:
        yield starting[0].result(), starting[1].result()
    finally:
        for future in starting:
            if future.exception() is None:
                future.result().stop()
        redis.stop()


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    found = load_samples()[BREAST]
    return found.raw, found.expected


def _client(url: str | list[str], who: str = "alice", retry: Retry | None = RETRY) -> HEClient:
    return HEClient(url, token=TOKENS[who], retry=retry)


def test_keys_uploaded_on_one_instance_serve_predictions_on_the_other(
    instances: tuple[ServedProcess, ServedProcess], samples: tuple[np.ndarray, np.ndarray]
) -> None:
    a, b = instances
    raw, expected = samples
    with _client(a.url) as on_a, _client(b.url) as on_b:
        session = on_a.model(BREAST)
        assert on_b.has_context(session.context_id)
        with _client(b.url, "bob") as bob:  # shared, and still private to its owner
            assert not bob.has_context(session.context_id)
        # Opening a session on b with the same keys finds the context there: no upload.
        on_b_session = on_b.model(BREAST, keys=session.keys)
        assert on_b_session.context_id == session.context_id
        rows = np.arange(8)
        outputs = on_b_session.predict_many(raw[rows])
        assert (outputs.argmax(axis=1) == expected[rows]).all()


def test_an_upload_in_parts_spans_both_instances(
    instances: tuple[ServedProcess, ServedProcess], samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """Batch plan: upload opened on a, parts sent to a and b in turn, evaluated on b."""
    a, b = instances
    raw, expected = samples
    rows = np.arange(min(64, len(raw)))
    with _client(a.url) as on_a, _client(b.url) as on_b:
        session = on_a.model(BREAST, plan=PlanKind.BATCH)
        keys: KeySet = session.keys
        card, spec = session.card, session.spec
        prepared = np.stack(
            [preprocess(x, card.preprocessing, card.input_shape) for x in raw[rows]]
        )
        (vectors,) = spec.input_encoding.units(prepared)
        upload = on_a.create_upload(BREAST, session.context_id, plan=PlanKind.BATCH)
        parts = list(vectors)
        for index, vector in enumerate(parts):  # one ciphertext per part, a and b in turn
            (on_a if index % 2 == 0 else on_b).upload_part(
                upload["upload_id"], index, [keys.encrypt(vector)]
            )
        assert len(parts) >= 2, "a single part would not span both instances"
        outputs, _ = on_b.predict_upload(upload["upload_id"])
    released = release(keys, outputs, spec.output_decoding, len(rows), spec.output_precision)
    assert (released.argmax(axis=1) == expected[rows]).all()


def test_a_tokens_sample_budget_is_spent_across_both_instances(
    instances: tuple[ServedProcess, ServedProcess],
    samples: tuple[np.ndarray, np.ndarray],
    group: int,
) -> None:
    a, b = instances
    raw, _ = samples
    with _client(a.url, "bob", retry=None) as on_a, _client(b.url, "bob", retry=None) as on_b:
        on_a_session = on_a.model(BREAST, plan=PlanKind.BATCH)
        on_b_session = on_b.model(BREAST, plan=PlanKind.BATCH, keys=on_a_session.keys)
        assert on_a_session.spec.samples_per_unit == group
        on_a_session.predict_many(raw[:2])  # one group charged on a ...
        on_b_session.predict_many(raw[:2])  # ... and one on b: two fit the budget
        # A third would fit b's own count (one group): refused, so b counts a's charge too.
        with pytest.raises(RateLimitedError, match="sample budget") as refused:
            on_b_session.predict_many(raw[:2])
    assert f"{2 * group} used" in str(refused.value)


def test_a_client_of_both_instances_answers_every_row_when_one_is_killed(
    instances: tuple[ServedProcess, ServedProcess],
    samples: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = instances
    raw, expected = samples
    failed: list[str] = []
    done = [0]
    with _client([a.url, b.url]) as client:
        session = client.model(BREAST)

        def stream() -> None:
            rng = np.random.default_rng(13)
            for _ in range(REQUESTS):
                rows = rng.choice(len(raw), ROWS_PER_REQUEST)
                try:
                    classes = session.predict_many(raw[rows]).argmax(axis=1)
                except Exception as exc:  # a failed request fails all its rows
                    failed.extend(f"row {r}: {exc}" for r in rows)
                else:
                    failed.extend(f"row {r}: wrong class" for r in rows[classes != expected[rows]])
                done[0] += 1

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        _kill_when_busy(a, lambda: done[0] >= KILL_AFTER, deadline=time.monotonic() + 60)
        killed_at = done[0]
        worker.join(timeout=90)
        assert not worker.is_alive(), "the stream hangs"
        answered_by = client.base_url
    assert not failed, failed[:5]
    assert done[0] == REQUESTS
    assert answered_by.rstrip("/") == b.url, "the client never moved to the other instance"
    assert b.process.poll() is None and not b.server_errors()
    # The command line takes both URLs too, the dead one first.
    assert cli.main(["--url", f"{a.url},{b.url}", "--token", TOKENS["alice"], "models"]) == 0
    assert BREAST in capsys.readouterr().out
    metrics = httpx.get(f"{b.url}/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"})
    assert 'route="/v1/models/<name>/predict"' in metrics.text, metrics.text[:500]
    with capsys.disabled():
        print(
            f"\n{done[0] * ROWS_PER_REQUEST} rows answered, 0 failed; "
            f"the first instance killed after {killed_at} requests"
        )


def _kill_when_busy(served: ServedProcess, ready: Callable[[], bool], deadline: float) -> None:
    """SIGKILL the instance once ``ready()`` holds and it is using the CPU: mid-request."""
    pid = served.process.pid
    while time.monotonic() < deadline:
        if ready():
            before = _cpu_ticks(pid)
            time.sleep(0.02)
            if _cpu_ticks(pid) > before:
                os.kill(pid, signal.SIGKILL)
                served.process.wait(timeout=10)
                return
        else:
            time.sleep(0.02)
    pytest.fail("the first instance was never busy after the first requests")


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
