"""Command line ``he-models``: train, convert, export and evaluate models for the service.

Examples::

    he-models list
    he-models train mnist-cnn                 # writes models/artifacts/mnist-cnn/
    he-models train digits-cnn --out /tmp/artifacts --seed 1
    he-models evaluate breast-cancer-mlp      # plaintext, polynomial and encrypted accuracy
    he-models audit breast-cancer-mlp digits-cnn --shadows 8 --markdown   # membership attacks
    he-models convert mypkg.nets:make_net --weights net.pt --calibration x.npy --name my-net
    he-models convert mypkg.nets:Regressor --weights r.pt --calibration x.npy --name my-reg \
        --standardize --task regression --key-budget 32

``convert`` imports ``MODULE`` (the current directory is searched first, as with
``python -m``), calls ``FACTORY()`` for an untrained model, loads the state dict with
``torch.load(..., weights_only=True)`` (no arbitrary objects are unpickled) and reads the
calibration samples with ``np.load(..., allow_pickle=False)``.

After a successful export, ``convert`` and ``train`` print what the model card will say about
each plan (ring, primes, depth, public-key and request bytes, rotations, Galois keys), as the
engine compiled it.

Exit codes: 0 success, 1 the artifact could not be exported (the engine refuses it: too deep,
public keys over the budget; or writing failed; nothing is written), 2 a usage or input error
(unknown model, unsupported layers, unreadable files). Errors are one message on stderr, never
a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from he_service.artifacts import DEFAULT_TASK, TASKS
from he_service.engine import DEFAULT_KEY_BUDGET_BYTES
from models.audit import DEFAULT_SHADOWS
from models.export import ExportError, plan_lines, torch_release
from models.recipes import DEFAULT_OUT_DIR, RECIPES, UnknownModelError, build

if TYPE_CHECKING:
    from models.conversion import ConversionReport

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """A problem with the command's inputs; reported with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="he-models",
        description="Train, convert and export models for encrypted (CKKS) inference.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the model recipes that can be trained")

    train = commands.add_parser("train", help="train a model recipe and export its artifact")
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

    convert = commands.add_parser(
        "convert",
        help="convert a trained torch model (ReLU, BatchNorm, pooling) into an artifact",
        description="Convert a trained torch model into a CKKS-friendly artifact: BatchNorm is "
        "folded, average pooling becomes a convolution, activations become polynomials fitted "
        "on the calibration data. Unsupported layers are all listed, with what to use instead.",
    )
    convert.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. mypkg.nets:Net")
    convert.add_argument(
        "--weights", type=Path, required=True, help="state dict saved with torch.save"
    )
    convert.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help=".npy of raw input samples (n, *input_shape), e.g. training data",
    )
    convert.add_argument("--name", required=True, help="artifact name ([a-z0-9-])")
    convert.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="parent directory of the artifact (default: %(default)s)",
    )
    degree = convert.add_mutually_exclusive_group()
    degree.add_argument("--degree", type=int, help="one polynomial degree for every activation")
    degree.add_argument(
        "--max-degree",
        type=int,
        default=4,
        help="per activation, the smallest degree from 2 up to this one whose fit error is "
        "within --tolerance (default: %(default)s)",
    )
    convert.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="relative fit error accepted by the automatic degree choice (default: 0.15)",
    )
    convert.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        metavar="DIM",
        help="shape of one sample, e.g. 1 28 28 (default: the calibration array's)",
    )
    convert.add_argument(
        "--scale", type=float, default=1.0, help="preprocessing: x * scale (default: 1)"
    )
    convert.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="preprocessing: minus mean, one value or one per channel/feature (default: 0)",
    )
    convert.add_argument(
        "--std",
        type=float,
        nargs="+",
        help="preprocessing: divided by std, one value or one per channel/feature (default: 1)",
    )
    convert.add_argument(
        "--standardize",
        action="store_true",
        help="preprocessing: mean and std per feature (vectors) or per channel (images) of the "
        "calibration samples after --scale, instead of --mean/--std",
    )
    convert.add_argument(
        "--task",
        choices=TASKS,
        default=DEFAULT_TASK,
        help="what the outputs are: class scores or predicted values (default: %(default)s)",
    )
    convert.add_argument(
        "--key-budget",
        type=float,
        metavar="MB",
        help="largest public-key bundle a plan may need, in MiB (2^20 bytes), recorded in the "
        "manifest; the engine refuses plans above it (default: the engine's "
        f"{DEFAULT_KEY_BUDGET_BYTES / 2**20:g} MiB)",
    )
    convert.add_argument(
        "--labels",
        help="comma-separated output labels, or for regression output names (default: 0..k-1)",
    )
    convert.add_argument("--description", default="", help="one line for the model card")

    evaluate = commands.add_parser(
        "evaluate",
        help="measure an artifact: original, polynomial and encrypted accuracy (or MSE)",
        description="Print the original network's accuracy (recorded in the manifest), the "
        "polynomial network's accuracy on the held-out split and the accuracy drop, encrypted "
        "accuracy and encrypted-vs-polynomial agreement, and how often held-out pre-activations "
        "leave the calibrated ranges. For a regression artifact: MSE, MAE and R^2 instead of "
        "accuracy, and the largest encrypted-vs-polynomial error.",
    )
    evaluate.add_argument("name", help="artifact name")
    evaluate.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="directory holding the artifact (default: %(default)s)",
    )
    evaluate.add_argument(
        "--samples",
        type=int,
        default=200,
        help="held-out samples to run encrypted (default: %(default)s; 0 = all)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="SEAL seed (default: 0)")
    evaluate.add_argument("--data", type=Path, help=".npy of raw held-out samples")
    evaluate.add_argument(
        "--targets", type=Path, help=".npy of held-out labels (ints) or regression targets"
    )

    audit = commands.add_parser(
        "audit",
        help="measure training-data leakage with membership-inference attacks",
        description="Attack each artifact's plaintext polynomial network on its own split "
        "(members: the training split, non-members: the held-out split) with the loss-threshold "
        "attack and the online likelihood-ratio attack (LiRA), whose shadow models the recipe "
        "trains on random subsets of both splits, each as large as the training split. Prints "
        "each attack's AUC and true-positive rate at 1% false positives, the held-out accuracy, "
        "the DP epsilon and the time taken.",
    )
    audit.add_argument("names", nargs="+", metavar="NAME", help="artifact made by a recipe")
    audit.add_argument(
        "--shadows",
        type=int,
        default=DEFAULT_SHADOWS,
        help="shadow models for LiRA, at least 2 (default: %(default)s)",
    )
    audit.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the shadow models' data and training (default: %(default)s)",
    )
    audit.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="directory holding the artifacts (default: %(default)s)",
    )
    audit.add_argument(
        "--markdown",
        action="store_true",
        help="print a Markdown table, one row per model (times go to stderr)",
    )
    return parser


def _list() -> int:
    width = max(len(name) for name in RECIPES)
    for name, recipe in sorted(RECIPES.items()):
        shipped = "" if recipe.shipped else " (not shipped: `he-models train` builds it)"
        print(f"{name:<{width}}  {recipe.description}{shipped}")
    return EXIT_OK


def _train(name: str, out: Path, seed: int, split_seed: int) -> int:
    try:
        result = build(name, out, seed=seed, split_seed=split_seed)
    except UnknownModelError as exc:
        raise _UsageError(str(exc)) from None
    except (ExportError, OSError) as exc:
        print(f"he-models: error: could not export {name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    s = result.summary
    print(
        f"{result.name}: original (ReLU) accuracy {s['original_accuracy']:.4f}, "
        f"polynomial accuracy {s['poly_accuracy']:.4f}, "
        f"encrypted accuracy {s['encrypted_accuracy']:.4f} and agreement "
        f"{s['encrypted_agreement']:.4f} on {s['encrypted_samples']} samples"
    )
    print(
        f"depth {s['depth']}, max |output| {s['max_abs_output']:.1f}; trained and converted in "
        f"{result.train_seconds:.1f} s, encrypted check {s['encrypted_seconds']:.1f} s"
    )
    for line in plan_lines(result.compiled):
        print(line)
    print(f"wrote {result.path}")
    print(f"weights.npz sha256 {result.weights_sha256}")
    return EXIT_OK


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_factory(spec: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"expected MODULE:FACTORY (e.g. mypkg.nets:Net), got {spec!r}")
    # Like `python -m`: a module next to the user's working directory is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise _UsageError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise _UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise _UsageError(f"{spec} is not callable")
    return factory


def _state_dict(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable or unsafe files
        raise _UsageError(
            f"cannot load weights from {path} with torch.load(weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise _UsageError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _convert(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from models.conversion import convert
    from models.packaging import export_converted
    from models.problems import ConversionError
    from models.training import preprocess_batch

    factory = _load_factory(args.factory)
    if not args.weights.is_file():
        raise _UsageError(f"weights file {args.weights} does not exist")
    if not args.calibration.is_file():
        raise _UsageError(f"calibration file {args.calibration} does not exist")
    try:
        raw = np.load(args.calibration, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise _UsageError(f"cannot read {args.calibration} as a .npy array: {exc}") from None
    if raw.ndim < 2 or raw.shape[0] == 0 or not np.issubdtype(raw.dtype, np.number):
        raise _UsageError(
            f"{args.calibration} must hold numbers shaped (samples, *input_shape), "
            f"got {raw.dtype} {raw.shape}"
        )
    shape = tuple(args.input_shape) if args.input_shape else tuple(raw.shape[1:])
    if int(np.prod(shape)) != int(np.prod(raw.shape[1:])):
        raise _UsageError(
            f"--input-shape {list(shape)} does not match the calibration samples {raw.shape[1:]}"
        )
    channels = shape[0]
    if args.standardize:
        if args.mean is not None or args.std is not None:
            raise _UsageError(
                "--standardize computes --mean and --std from the calibration data; give "
                "either --standardize or --mean/--std"
            )
        mean, std = _standardization(raw, shape, args.scale)
    else:
        mean = args.mean if args.mean is not None else [0.0]
        std = args.std if args.std is not None else [1.0]
    for label, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 value or {channels} (one per channel)"
            raise _UsageError(f"{label} takes {allowed}, got {len(values)}")
    if any(v == 0.0 for v in std):
        raise _UsageError("--std must not contain 0")
    key_budget = None
    if args.key_budget is not None:
        key_budget = round(args.key_budget * 2**20)
        if key_budget <= 0:
            raise _UsageError(f"--key-budget must be positive, got {args.key_budget}")
    preprocessing = {"scale": args.scale, "mean": list(mean), "std": list(std)}
    x = preprocess_batch(raw, preprocessing, shape)

    try:
        model = factory()
    except Exception as exc:  # the user's factory may fail in any way
        raise _UsageError(f"{args.factory}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise _UsageError(f"{args.factory}() returned {type(model).__name__}, not a torch module")
    try:
        model.load_state_dict(_state_dict(args.weights))
    except RuntimeError as exc:
        raise _UsageError(f"the weights do not fit {args.factory}(): {exc}") from None
    model.eval()

    try:
        network, report = convert(
            model,
            x,
            degrees=args.degree,
            max_degree=args.max_degree,
            **({} if args.tolerance is None else {"tolerance": args.tolerance}),
        )
    except ConversionError as exc:
        raise _UsageError(str(exc)) from None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    with torch.no_grad():
        outputs = int(network(torch.tensor(x[:1], dtype=torch.float64)).shape[1])
    labels = args.labels.split(",") if args.labels else [str(i) for i in range(outputs)]
    if len(labels) != outputs:
        raise _UsageError(f"--labels names {len(labels)} outputs, the network has {outputs}")
    for line in report.lines():
        print(line)
    command = ["he-models", "convert", args.factory, "--name", args.name]
    try:
        result = export_converted(
            network,
            args.out,
            args.name,
            labels=labels,
            preprocessing=preprocessing,
            check_x=x,
            description=args.description,
            report=report,
            provenance={
                "command": " ".join(command),
                "weights_sha256": _sha256(args.weights),
                "calibration_sha256": _sha256(args.calibration),
                "torch": torch_release(),
            },
            task=args.task,
            key_budget_bytes=key_budget,
        )
    except ValueError as exc:  # a bad artifact name
        raise _UsageError(str(exc)) from None
    except ExportError as exc:
        print(
            f"he-models: error: could not export {args.name}: {exc} ({_levels(report)})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except OSError as exc:
        print(f"he-models: error: could not export {args.name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for line in plan_lines(result.compiled):
        print(line)
    print(f"wrote {result.path}")
    print(f"weights.npz sha256 {result.weights_sha256}")
    return EXIT_OK


def _standardization(
    raw: np.ndarray, shape: tuple[int, ...], scale: float
) -> tuple[list[float], list[float]]:
    """Return the per-channel (per-feature) mean and std of the scaled calibration samples.

    A constant channel gets std 1: there is nothing to scale, and 0 would divide by zero.
    """
    values = np.asarray(raw, dtype=np.float64).reshape((-1, *shape)) * scale
    axes = (0, *range(2, values.ndim))
    mean = values.mean(axis=axes)
    std = values.std(axis=axes)
    return [float(v) for v in mean], [float(v) if v > 0 else 1.0 for v in std]


def _levels(report: ConversionReport) -> str:
    """Say what makes the converted network deep, and the cheapest way to make it shallower."""
    degrees = [fit.degree for fit in report.activations]
    counts = ", ".join(f"{degrees.count(d)} of degree {d}" for d in sorted(set(degrees)))
    text = (
        f"the converted network has {len(degrees)} fitted activations"
        + (f" ({counts})" if degrees else "")
        + f", depth {report.depth} on its longest path"
    )
    if any(d > 2 for d in degrees):
        text += "; --degree 2 costs one level per activation instead of two"
    return text


def _evaluate(args: argparse.Namespace) -> int:
    from he_service.artifacts import ArtifactError, load_artifact
    from models.evaluation import evaluate_artifact

    directory = args.models_dir / args.name
    try:
        manifest = load_artifact(directory).manifest
    except ArtifactError as exc:
        raise _UsageError(str(exc)) from None
    if (args.data is None) != (args.targets is None):
        raise _UsageError("--data and --targets go together")
    if args.samples < 0:
        raise _UsageError("--samples must be >= 0")
    if args.data is not None:
        try:
            x = np.load(args.data, allow_pickle=False)
            y = np.load(args.targets, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise _UsageError(f"cannot read the held-out data: {exc}") from None
        if len(x) != len(y) or len(x) == 0:
            raise _UsageError(f"--data has {len(x)} samples but --targets {len(y)} labels")
    elif args.name in RECIPES:
        split = RECIPES[args.name].load_split(
            int(manifest.get("training", {}).get("split_seed", 0))
        )
        x, y = split.x_test, split.y_test
    else:
        raise _UsageError(
            f"no held-out data is known for {args.name!r} (it is not a recipe); "
            "pass --data X.npy --targets Y.npy"
        )
    evaluation = evaluate_artifact(
        directory, x, y, encrypted_samples=args.samples or None, seed=args.seed
    )
    for line in evaluation.lines():
        print(line)
    return EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    from models.audit import MARKDOWN_HEADER, AuditError, audit, load_target

    if args.shadows < 2:
        raise _UsageError(
            f"--shadows must be at least 2 (LiRA fits IN and OUT statistics), got {args.shadows}"
        )
    # Every name is checked before the first (minutes-long) audit starts.
    try:
        targets = [load_target(name, args.models_dir) for name in args.names]
    except AuditError as exc:
        raise _UsageError(str(exc)) from None
    if args.markdown:
        print(MARKDOWN_HEADER)
    for target in targets:
        result = audit(target, shadows=args.shadows, seed=args.seed)
        if args.markdown:
            print(result.markdown_row(), flush=True)
            print(f"{result.name}: audited in {result.seconds:.1f} s", file=sys.stderr)
        else:
            print("\n".join(result.lines()), flush=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``he-models`` command line.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 if exporting failed, 2 for a usage or input error such
        as an unknown model name or an unsupported layer.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); report, don't exit, so that
        # main() stays callable from tests and other Python code.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "list":
            return _list()
        if args.command == "train":
            return _train(args.name, args.out, args.seed, args.split_seed)
        if args.command == "convert":
            return _convert(args)
        if args.command == "audit":
            return _audit(args)
        return _evaluate(args)
    except _UsageError as exc:
        print(f"he-models: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
