"""Command line ``he-models``: train and export the model artifacts the service serves.

Examples::

    he-models list
    he-models train mnist-cnn                 # writes models/artifacts/mnist-cnn/
    he-models train mnist-cnn --out /tmp/artifacts --seed 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from models.export import ExportError
from models.recipes import DEFAULT_OUT_DIR, RECIPES, UnknownModelError, build

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="he-models",
        description="Train and export models for encrypted (CKKS) inference.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the model recipes that can be trained")
    train = commands.add_parser("train", help="train a model and export its artifact")
    # No argparse `choices`: the registry gives a clearer message than argparse's usage dump.
    train.add_argument("name", help="model recipe, see `he-models list`")
    train.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="parent directory of the artifact (default: %(default)s)",
    )
    train.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    train.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/test split (default: %(default)s)",
    )
    return parser


def _list() -> int:
    width = max(len(name) for name in RECIPES)
    for name, recipe in sorted(RECIPES.items()):
        print(f"{name:<{width}}  {recipe.description}")
    return EXIT_OK


def _train(name: str, out: Path, seed: int, split_seed: int) -> int:
    try:
        result = build(name, out, seed=seed, split_seed=split_seed)
    except UnknownModelError as exc:
        print(f"he-models: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ExportError, OSError) as exc:
        print(f"he-models: error: could not export {name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{result.name}: test accuracy {result.test_accuracy:.4f} "
        f"(trained in {result.train_seconds:.1f} s)"
    )
    print(f"wrote {result.path}")
    print(f"weights.npz sha256 {result.weights_sha256}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``he-models`` command line.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 if exporting failed, 2 for a usage error such as an
        unknown model name.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); report, don't exit, so that
        # main() stays callable from tests and other Python code.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "list":
        return _list()
    return _train(args.name, args.out, args.seed, args.split_seed)


if __name__ == "__main__":
    sys.exit(main())
