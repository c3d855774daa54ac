"""Benchmark fixtures: the service under waitress on a loopback port, one key set per model."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from flask import Flask
from waitress.server import create_server

from clients import HEClient, ModelSession
from he_service import create_app


@pytest.fixture(scope="session")
def app() -> Flask:
    return create_app()


@pytest.fixture(scope="session")
def server_url(app: Flask) -> Iterator[str]:
    """Serve the app with the production WSGI server on 127.0.0.1, in a background thread."""
    server = create_server(
        app, host="127.0.0.1", port=0, threads=2, max_request_body_size=256 << 20
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


@pytest.fixture(scope="session")
def client(server_url: str) -> Iterator[HEClient]:
    with HEClient(server_url) as he_client:
        yield he_client


_sessions: dict[str, ModelSession] = {}


@pytest.fixture
def session_for(client: HEClient):  # type: ignore[no-untyped-def]
    def get(name: str) -> ModelSession:
        if name not in _sessions:
            _sessions[name] = client.model(name)
        return _sessions[name]

    return get
