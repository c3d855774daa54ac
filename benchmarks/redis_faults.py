"""Measure what a frozen (SIGSTOP) and a dead (SIGKILL) Redis cost the service's requests.

    python -m benchmarks.redis_faults

Prints seconds: a Redis-backed request (HEAD of a context) while Redis is frozen, the first and
the following ones; GET /v1/models and /v1/health meanwhile; the time until the service answers
from Redis again after SIGCONT, and after a restart of a killed server on the same port.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from he_service import create_app
from he_service.config import DEFAULT_MODELS_DIR
from tests.redis_server import RedisServer

CONTEXT = "/v1/contexts/" + "ab" * 32


def _show(label: str, call) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    status = call().status_code
    print(f"{label}: status {status} in {time.monotonic() - start:.3f} s")


def _recovery(http) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while http.head(CONTEXT).status_code != 404:
        if time.monotonic() - start > 120:
            return float("inf")
        time.sleep(0.05)
    return time.monotonic() - start


def main() -> None:
    models = Path(tempfile.mkdtemp()) / "models"
    shutil.copytree(DEFAULT_MODELS_DIR / "breast-cancer-mlp", models / "breast-cancer-mlp")
    server = RedisServer().start()
    try:
        app = create_app({"models_dir": models, "redis_url": server.url})
        http = app.test_client()
        assert http.head(CONTEXT).status_code == 404
        server.freeze()
        for i in range(3):
            _show(f"frozen: HEAD context #{i + 1}", lambda: http.head(CONTEXT))
        _show("frozen: GET /v1/models", lambda: http.get("/v1/models"))
        _show("frozen: GET /v1/health", lambda: http.get("/v1/health"))
        server.thaw()
        print(f"SIGCONT: Redis-backed route answers again after {_recovery(http):.3f} s")
        server.kill()
        for i in range(3):
            _show(f"dead: HEAD context #{i + 1}", lambda: http.head(CONTEXT))
        _show("dead: GET /v1/models", lambda: http.get("/v1/models"))
        server.start()
        print(f"restart: Redis-backed route answers again after {_recovery(http):.3f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
