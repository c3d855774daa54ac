"""``he-service``: serve the models over HTTP, and make API tokens.

``serve`` runs one process (``--workers 1``, the default, works everywhere) or a gunicorn
master with several worker processes (``--workers N``): SEAL evaluation holds the GIL, so only
processes evaluate in parallel. Every process reads its connections with the same event-loop
front (``he_service.front``: waitress's channels, deadlines, limits decided from the headers),
so slow sockets never hold a worker thread. Each worker builds its own app (SEAL objects are not
shared across ``fork``); Prometheus metrics are merged across workers through a temporary
``PROMETHEUS_MULTIPROC_DIR``. SIGTERM or SIGINT stops accepting connections, lets requests in
flight finish for up to ``--graceful-timeout`` seconds, then exits 0; a second signal stops at
once.
"""

from __future__ import annotations

import argparse
import dataclasses
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

    from he_service.front import FrontSettings

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
        help="worker processes: more than 1 runs a gunicorn master that restarts them (default 1)",
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
    serve.add_argument(
        "--connection-limit",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="open connections per worker process; at the limit the connection waiting "
        "longest for a request is closed to admit a new one (default 1000)",
    )
    serve.add_argument(
        "--read-timeout",
        type=_positive_int,
        default=30,
        metavar="S",
        help="seconds a connection gets to send a request's headers (or to stay idle); a body "
        "gets as long, plus time for each 16 KiB received (default 30)",
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
            if args.workers > 1 and not config.memory_budget_bytes:
                # The default budget is the host's: the workers share it.
                config = dataclasses.replace(
                    config, memory_budget_bytes=config.memory_budget() // args.workers
                )
        except ValueError as exc:
            print(f"he-service: {exc}", file=sys.stderr)
            return 2
        # Each connection is a descriptor; the loop, its trigger and the stores need a few more.
        problem = _descriptors(args.connection_limit + 64)
        if problem is not None:
            print(f"he-service: {problem}", file=sys.stderr)
            return 2
        if multiproc_dir is None:
            return _serve_waitress(args, config)
        return _serve_gunicorn(args, config)
    finally:
        if multiproc_dir is not None and os.getpid() == owner:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
            os.environ.pop(_MULTIPROC_ENV, None)


def _front_settings(args: argparse.Namespace, config: Config) -> FrontSettings:
    from he_service.front import FrontSettings

    return FrontSettings(
        threads=args.threads,
        connection_limit=args.connection_limit,
        read_timeout=args.read_timeout,
        max_header_bytes=LIMIT_REQUEST_LINE + LIMIT_REQUEST_FIELDS * LIMIT_REQUEST_FIELD_SIZE,
        max_body_bytes=config.max_any_body_bytes,
    )


def _descriptors(needed: int) -> str | None:
    """Raise the open-file limit to ``needed`` if it is lower; return why not if it cannot."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to check
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard != resource.RLIM_INFINITY and hard < needed:
        return (
            f"--connection-limit needs {needed} open files, the hard limit is {hard}; "
            "lower --connection-limit or raise the limit (ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return None


def _serve_waitress(args: argparse.Namespace, config: Config) -> int:
    """Serve in this process (one event loop), draining requests in flight on SIGTERM/SIGINT."""
    from he_service.app import create_app
    from he_service.front import Front

    try:
        app = create_app(config)
        front = Front(app, _front_settings(args, config), host=args.host, port=args.port)
    except _startup_errors() as exc:
        print(f"he-service: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the address is taken or cannot be bound
        print(
            f"he-service: cannot listen on {_netloc(args.host, args.port)}: {exc}", file=sys.stderr
        )
        return 2
    print(
        f"he-service: serving {_names(app)} on http://{_netloc(args.host, args.port)}", flush=True
    )
    stopping: list[float] = []

    def stop(signum: int, _: object) -> None:
        if stopping:
            raise KeyboardInterrupt  # a second signal: stop now
        stopping.append(time.monotonic())
        log.info("%s: finishing requests in flight", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        front.run(lambda: bool(stopping), args.graceful_timeout)
    except KeyboardInterrupt:
        log.warning("stopping now; requests in flight are dropped")
        front.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _serve_gunicorn(args: argparse.Namespace, config: Config) -> int:
    """Run a gunicorn master with ``--workers`` gthread workers, each building its own app."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.glogging import Logger
    from gunicorn.workers.base import Worker
    from prometheus_client import multiprocess

    from he_service.front import Front

    class JsonLogger(Logger):
        """Gunicorn's own messages go to the root logger, hence out as JSON lines."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for logger in (self.error_log, self.access_log):
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
            self.error_log.propagate = True
            self.access_log.propagate = False  # the app writes its own access log

    settings = _front_settings(args, config)

    class FrontWorker(Worker):
        """A worker that serves gunicorn's listening sockets with the event-loop front.

        Gunicorn keeps process management (restarts a dead worker, signals, graceful stop);
        the front reads every connection, so slow sockets never hold one of its threads.
        """

        alive: bool

        def init_signals(self) -> None:
            super().init_signals()
            signal.signal(signal.SIGINT, self.handle_exit)  # Ctrl-C is graceful, like SIGTERM

        def run(self) -> None:
            front = Front(self.wsgi, settings, sockets=[listener.sock for listener in self.sockets])

            def stopping() -> bool:
                if self.alive and self.ppid != os.getppid():
                    log.warning("the master process is gone; stopping")
                    self.alive = False
                return not self.alive

            front.run(stopping, self.cfg.graceful_timeout, tick=self.notify)

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
                "worker_class": FrontWorker,
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
