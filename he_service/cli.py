"""``he-service``: run the service under waitress, a production WSGI server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from he_service.config import Config

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run it; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="he-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the models over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models-dir", type=Path, help="artifact directory (default: shipped)")
    serve.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from waitress import serve as waitress_serve

    from he_service.app import create_app
    from he_service.registry import RegistryError

    overrides = {"models_dir": args.models_dir} if args.models_dir else {}
    try:
        config = Config.load(overrides)
        app = create_app(config)
    except (RegistryError, ValueError) as exc:
        print(f"he-service: {exc}", file=sys.stderr)
        return 2
    print(
        f"he-service: serving {', '.join(app.extensions['he_service']['registry'].names())} "
        f"on http://{args.host}:{args.port}",
        flush=True,
    )
    waitress_serve(
        app,
        host=args.host,
        port=args.port,
        threads=args.threads,
        max_request_body_size=max(config.max_context_bytes, config.max_predict_bytes),
        ident="he-service",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
