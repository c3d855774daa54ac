"""``he-client``: list models, predict an image or array, score a file, or run the demo."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from clients import score
from clients._client import HEClient, ModelSession
from clients._errors import HEClientError
from clients._outputs import OutOfRangeWarning, Outputs
from clients._readers import InputFileError
from he_service.protocol import Task

__all__ = ["load_sample", "main"]

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def load_sample(path: Path, shape: tuple[int, ...], *, invert: bool = False) -> np.ndarray:
    """Read a PNG/JPEG (as grayscale, resized to the model's H x W) or a ``.npy`` array.

    Raises:
        ValueError: unreadable file or wrong number of values.
    """
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False).astype(np.float64)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                gray = image.convert("L")
                if len(shape) == 3 and gray.size != (shape[2], shape[1]):
                    gray = gray.resize((shape[2], shape[1]), Image.Resampling.LANCZOS)
                array = np.asarray(gray, dtype=np.float64)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from None
    if invert:
        array = 255.0 - array
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values; the model expects shape {shape}")
    return np.asarray(array.reshape(shape))


def _print_prediction(
    session: ModelSession, path: Path, outputs: np.ndarray, truth: str | None = None
) -> None:
    """Print a class and its scores (classification) or named values (regression).

    Outputs flagged outside the model's calibrated ranges get a line saying so.
    """
    card = session.card
    if card.task == Task.REGRESSION:
        values = ", ".join(
            f"{name} = {value:.4g}" for name, value in zip(card.labels, outputs, strict=True)
        )
        print(f"{path.name}: predicted {values}")
    else:
        label = card.labels[int(np.argmax(outputs))]
        known = "" if truth is None else f" (true digit {truth})"
        print(f"{path.name}: predicted class {label}{known}")
        print("  logits: " + " ".join(f"{v:.3f}" for v in outputs))
    print(f"  output precision: {session.spec.output_precision:g} (released values are multiples)")
    if isinstance(outputs, Outputs) and outputs.out_of_range:
        print(
            "  UNRELIABLE: outputs outside the model's calibrated ranges (the input is unlike "
            "its calibration data)"
        )
    stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in session.last_timings.items())
    print(f"  timings: {stages}")


def _cmd_models(client: HEClient, _: argparse.Namespace) -> int:
    for model in client.models():
        print(
            f"{model['name']}: input {model['input_shape']}, {len(model['labels'])} outputs, "
            f"plans {', '.join(model['plans'])} - {model['description']}"
        )
    return 0


def _cmd_predict(client: HEClient, args: argparse.Namespace) -> int:
    session = client.model(args.model, keys=args.keys)
    if args.save_keys:
        session.save_keys(args.save_keys)
    for path in args.files:
        sample = load_sample(path, session.card.input_shape, invert=args.invert)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutOfRangeWarning)  # printed as a line instead
            outputs = session.predict(sample)
        _print_prediction(session, path, outputs)
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cmd_demo(_: HEClient | None, args: argparse.Namespace) -> int:
    """Start ``he-service serve`` on loopback, classify the shipped sample digits, stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The demo's keys are thrown away, so its contexts go to a store that is deleted after.
    store = tempfile.TemporaryDirectory(prefix="he-demo-")
    server = subprocess.Popen(
        [sys.executable, "-m", "he_service.cli", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HE_SERVICE_KEY_STORE_DIR": store.name, "HE_SERVICE_API_TOKENS": ""},
    )
    try:
        with HEClient(url, timeout=args.timeout) as client:
            deadline = time.monotonic() + 60
            while True:
                if server.poll() is not None:
                    reason = server.stderr.read() if server.stderr else ""
                    print(f"he-client: the server exited: {reason}", file=sys.stderr)
                    return 1
                try:
                    client.health()
                    break
                except HEClientError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            print(f"server up at {url}; making CKKS keys and uploading the public context...")
            session = client.model("mnist-cnn")
            print(
                f"context {session.context_id[:16]}… uploaded "
                f"({len(session.public_context()) / 1e6:.1f} MB, no secret key)"
            )
            correct = 0
            samples = sorted(SAMPLES_DIR.glob("*.png"))
            for path in samples:
                sample = load_sample(path, session.card.input_shape)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", OutOfRangeWarning)  # printed as a line
                    logits = session.predict(sample)
                truth = path.stem.rsplit("-", 1)[-1]
                _print_prediction(session, path, logits, truth)
                correct += session.card.labels[int(np.argmax(logits))] == truth
            accuracy = session.card.details.get("training", {}).get("poly_accuracy")
            recorded = (
                ""
                if accuracy is None
                else (f" (the model's held-out accuracy, from its card: {accuracy:.1%})")
            )
            print(f"{correct}/{len(samples)} encrypted predictions match the true digit{recorded}")
            return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        store.cleanup()


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Parse the command line and run it; returns the process exit code.

    ``transport`` lets tests run the service in-process, as for ``HEClient``. An input file
    that cannot be scored exits with 2, any other failure with 1.
    """
    parser = argparse.ArgumentParser(prog="he-client", description=__doc__)
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="service base URL; several, comma-separated, for instances that share one Redis "
        "(the next is used when one is down)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout in seconds")
    parser.add_argument(
        "--token",
        default=os.environ.get("HE_TOKEN"),
        help="API token when the service requires one (default: $HE_TOKEN; prefer the "
        "variable: a command line is visible to other users of the machine)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the served models")
    predict = commands.add_parser("predict", help="encrypt files, predict, decrypt")
    predict.add_argument("--model", required=True)
    predict.add_argument("--keys", type=Path, help="key file from --save-keys (else new keys)")
    predict.add_argument("--save-keys", type=Path, help="write all keys (secret too) here, 0600")
    predict.add_argument("--invert", action="store_true", help="invert dark-on-light images")
    predict.add_argument("files", nargs="+", type=Path, help="PNG/JPEG images or .npy arrays")
    score.add_parser(commands)
    commands.add_parser("demo", help="start a local server and classify sample digits")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _cmd_demo(None, args)
        urls = [url for url in args.url.split(",") if url]
        with HEClient(urls, timeout=args.timeout, token=args.token, transport=transport) as client:
            handler = {"models": _cmd_models, "predict": _cmd_predict, "score": score.run}
            return handler[args.command](client, args)
    except InputFileError as exc:
        print(f"he-client: {exc}", file=sys.stderr)
        return 2
    except (HEClientError, ValueError, OSError) as exc:
        print(f"he-client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
