"""``he-service``: serve the models over HTTP, and make API tokens.

``serve`` runs one process under waitress (``--workers 1``, the default, works everywhere) or
several gunicorn ``gthread`` worker processes (``--workers N``): SEAL evaluation holds the GIL,
so only processes evaluate in parallel. Each worker builds its own app (SEAL objects are not
shared across ``fork``); Prometheus metrics are merged across workers through a temporary
``PROMETHEUS_MULTIPROC_DIR``. SIGTERM or SIGINT stops accepting connections, lets requests in
flight finish for up to ``--graceful-timeout`` seconds, then exits 0; a second signal stops at
once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from he_service.config import Config

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["main"]

log = logging.getLogger("he_service.serve")

# Request lines here are a method and a short path; a hundred headers is far more than any
# client sends. Bodies are bounded by the app before it reads them.
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="he-service", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the models over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models-dir", type=Path, help="artifact directory (default: shipped)")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes: 1 runs waitress, more run gunicorn gthread workers (default 1)",
    )
    serve.add_argument(
        "--threads", type=_positive_int, default=4, help="threads per worker (default 4)"
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_positive_int,
        default=30,
        metavar="S",
        help="seconds requests in flight get to finish on SIGTERM/SIGINT (default 30)",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    token = commands.add_parser(
        "hash-token",
        help="make an API token and its api_tokens entry",
        description="Print a new random token (unless TOKEN is given) and the "
        "'name:sha256' entry for HE_SERVICE_API_TOKENS. The server stores only the hash.",
    )
    token.add_argument("token", nargs="?", help="hash this token instead of making one")
    token.add_argument("--name", default="client", help="principal name (default 'client')")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run it; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "hash-token":
        return _hash_token(args.token, args.name)
    return _serve(args)


def _hash_token(token: str | None, name: str) -> int:
    from he_service.auth import TokenTable, hash_token, new_token

    generated = token is None
    token = new_token() if token is None else token
    if not token:
        print("he-service: the token is empty", file=sys.stderr)
        return 2
    if ":" in name or "," in name:
        print("he-service: a name holds no ':' nor ','", file=sys.stderr)
        return 2
    entry = f"{name}:{hash_token(token)}"
    try:
        TokenTable.parse(entry)  # the server's own checks (name charset, reserved names)
    except ValueError as exc:
        print(f"he-service: {exc}", file=sys.stderr)
        return 2
    if generated:
        print(f"token: {token}")
    print(f"config: {entry}")
    print(
        ("give the token to the client (it is stored nowhere); " if generated else "")
        + "append the config entry to HE_SERVICE_API_TOKENS (comma-separated)",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Gunicorn workers are forks of this process and leave through this stack too (by
    # SystemExit): only the process that made the directory may remove it.
    owner = os.getpid()
    multiproc_dir = None
    if args.workers > 1:
        # Before anything imports prometheus_client: it picks its storage at import.
        multiproc_dir = tempfile.mkdtemp(prefix="he-service-metrics-")
        os.environ[_MULTIPROC_ENV] = multiproc_dir
    try:
        from he_service.observability import configure_logging

        try:
            configure_logging(args.log_level)
            overrides = {"models_dir": args.models_dir} if args.models_dir else {}
            config = Config.load(overrides)
        except ValueError as exc:
            print(f"he-service: {exc}", file=sys.stderr)
            return 2
        if multiproc_dir is None:
            return _serve_waitress(args, config)
        return _serve_gunicorn(args, config)
    finally:
        if multiproc_dir is not None and os.getpid() == owner:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
            os.environ.pop(_MULTIPROC_ENV, None)


def _serve_waitress(args: argparse.Namespace, config: Config) -> int:
    """Serve in this process under waitress, draining requests in flight on SIGTERM/SIGINT."""
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer, create_server

    from he_service.app import create_app

    try:
        app = create_app(config)
    except _startup_errors() as exc:
        print(f"he-service: {exc}", file=sys.stderr)
        return 2
    socket_map: dict[int, Any] = {}
    server = create_server(
        app,
        map=socket_map,
        host=args.host,
        port=args.port,
        threads=args.threads,
        max_request_body_size=config.max_any_body_bytes,
        ident="he-service",
    )
    print(
        f"he-service: serving {_names(app)} on http://{_netloc(args.host, args.port)}", flush=True
    )
    deadline: list[float] = []

    def stop(signum: int, _: object) -> None:
        if deadline:
            raise KeyboardInterrupt  # a second signal: stop now
        deadline.append(time.monotonic() + args.graceful_timeout)
        log.info("%s: finishing requests in flight", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not deadline:
            wasyncore.loop(timeout=0.2, map=socket_map, use_poll=True, count=1)
        # Stop accepting (close the listening sockets), then let open requests finish.
        for channel in list(socket_map.values()):
            if isinstance(channel, BaseWSGIServer):
                wasyncore.dispatcher.close(channel)
        while time.monotonic() < deadline[0]:
            busy = [
                c
                for c in socket_map.values()
                if isinstance(c, HTTPChannel)
                and (c.requests or c.request is not None or c.total_outbufs_len)
            ]
            if not busy:
                break
            wasyncore.loop(timeout=0.05, map=socket_map, use_poll=True, count=1)
        else:
            log.warning("graceful timeout: closing connections with requests in flight")
    except KeyboardInterrupt:
        log.warning("stopping now; requests in flight are dropped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        wasyncore.close_all(socket_map)
    log.info("stopped")
    return 0


def _serve_gunicorn(args: argparse.Namespace, config: Config) -> int:
    """Run a gunicorn master with ``--workers`` gthread workers, each building its own app."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.glogging import Logger
    from gunicorn.workers.gthread import ThreadWorker
    from prometheus_client import multiprocess

    class JsonLogger(Logger):
        """Gunicorn's own messages go to the root logger, hence out as JSON lines."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for logger in (self.error_log, self.access_log):
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
            self.error_log.propagate = True
            self.access_log.propagate = False  # the app writes its own access log

    class GthreadWorker(ThreadWorker):
        """A gthread worker for which SIGINT (Ctrl-C) is graceful, like SIGTERM."""

        def init_signals(self) -> None:
            super().init_signals()
            signal.signal(signal.SIGINT, self.handle_exit)

    class Master(Arbiter):
        def handle_int(self) -> None:
            # Graceful like SIGTERM; a second SIGINT while stopping is a quick shutdown.
            raise StopIteration

    class Server(BaseApplication):
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": [_netloc(args.host, args.port)],
                "workers": args.workers,
                "threads": args.threads,
                "worker_class": GthreadWorker,
                "preload_app": False,  # SEAL objects must not cross a fork
                "graceful_timeout": args.graceful_timeout,
                "limit_request_line": LIMIT_REQUEST_LINE,
                "limit_request_fields": LIMIT_REQUEST_FIELDS,
                "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": args.log_level.lower(),
                "logger_class": JsonLogger,
                "proc_name": "he-service",
                "when_ready": when_ready,
                "child_exit": child_exit,
                "control_socket_disable": True,  # no socket file in $HOME per instance
            }
            for key, value in options.items():
                if key in self.cfg.settings:  # older gunicorns lack some settings
                    self.cfg.set(key, value)

        def load(self) -> Flask:
            from he_service.app import create_app

            try:
                return create_app(config)
            except _startup_errors() as exc:
                log.error("cannot start a worker: %s", exc)
                raise SystemExit(Arbiter.WORKER_BOOT_ERROR) from None

        def run(self) -> None:
            try:
                Master(self).run()
            except RuntimeError as exc:  # what gunicorn's own run() reports this way
                print(f"he-service: {exc}", file=sys.stderr)
                raise SystemExit(1) from None

    def when_ready(_: Any) -> None:
        print(
            f"he-service: serving on http://{_netloc(args.host, args.port)} with "
            f"{args.workers} workers of {args.threads} threads",
            flush=True,
        )

    def child_exit(_: Any, worker: Any) -> None:
        # Drops the dead worker's live gauges; its counters stay in the totals.
        multiprocess.mark_process_dead(worker.pid)

    master = os.getpid()
    try:
        Server().run()
    except SystemExit as exit_:
        if os.getpid() != master:
            raise  # a worker leaving: its exit code is for the master to read
        code = exit_.code if isinstance(exit_.code, int) else 1
        if code == Arbiter.WORKER_BOOT_ERROR:
            print("he-service: a worker could not start; see the log above", file=sys.stderr)
            return 2
        return code
    return 0


def _startup_errors() -> tuple[type[Exception], ...]:
    """Return what ``create_app`` raises for a problem of the setup (one line, exit 2)."""
    from he_service.errors import ServiceError
    from he_service.registry import RegistryError
    from he_service.uploads import UploadError

    # ServiceError: the context store or the quota database is unusable (NotReady);
    # UploadError: the staging area; OSError: any other file the setup names (models dir).
    return (RegistryError, ValueError, ServiceError, UploadError, OSError)


def _names(app: Flask) -> str:
    state = app.extensions["he_service"]
    registry = state["registry"] if isinstance(state, dict) else state.registry
    return ", ".join(registry.names())


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    raise SystemExit(main())
