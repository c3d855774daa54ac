"""Command line ``he-models``: train, convert, export and evaluate models for the service.

Examples::

    he-models list
    he-models train mnist-cnn                 # writes models/artifacts/mnist-cnn/
    he-models train digits-cnn --out /tmp/artifacts --seed 1
    he-models train digits-cnn --dp-epsilon 8 --out /tmp/artifacts   # DP-SGD, delta 1e-5
    he-models sweep breast-cancer-mlp-dp --epsilons 0.5,1,3,8,none  # accuracy per epsilon
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

``--dp-epsilon`` trains with DP-SGD (Opacus): every training phase on the private records is
private, and the noise multiplier for the budget is chosen before training starts. Without
``--dp-noise-seed`` the noise seed is drawn from ``secrets`` and not recorded; with it the run is
reproducible and the manifest says the seed is public.

Exit codes: 0 success, 1 the artifact could not be exported (the engine refuses it: too deep,
public keys over the budget; or writing failed; nothing is written), 2 a usage or input error
(unknown model, unsupported layers, unreadable files, contradictory DP options or a privacy
budget no noise can meet). Errors are one message on stderr, never a traceback.
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
from models.privacy import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM
from models.recipes import DEFAULT_OUT_DIR, RECIPE_PRIVACY, RECIPES, UnknownModelError, build
from models.training import preprocess_batch

if TYPE_CHECKING:
    from models.conversion import ConversionReport
    from models.finetune import FineTuning
    from models.recipes import Privacy

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
    _add_privacy_options(train, "train the recipe")

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
    tuning = convert.add_argument_group(
        "fine-tuning on your data (optional; with --dp-epsilon, DP-SGD)",
        "After conversion, train the converted network's affine layers with its polynomials in "
        "place (models.fine_tune). Under DP the guarantee covers the fine-tuning records only: "
        "--weights and --calibration must not hold private records.",
    )
    tuning.add_argument(
        "--fine-tune-data", type=Path, help=".npy of raw training samples (n, *input_shape)"
    )
    tuning.add_argument(
        "--fine-tune-targets",
        type=Path,
        help=".npy of their labels (ints) or regression targets",
    )
    tuning.add_argument(
        "--fine-tune-epochs", type=int, default=5, help="epochs (default: %(default)s)"
    )
    tuning.add_argument(
        "--fine-tune-batch-size",
        type=int,
        default=64,
        help="batch size, expected batch size under DP (default: %(default)s)",
    )
    tuning.add_argument(
        "--fine-tune-lr", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)"
    )
    _add_privacy_options(convert, "fine-tune")

    sweep = commands.add_parser(
        "sweep",
        help="retrain a recipe at several privacy budgets and print held-out accuracy",
        description="Retrain a recipe (plaintext only, nothing exported) at each epsilon and "
        "print a markdown table of held-out accuracy, noise multiplier and training time. "
        "'none' trains without differential privacy (a DP recipe: the same steps with noise "
        "multiplier 0, so the table shows what the noise costs). The noise seed is the "
        "recipe's published one (or --dp-noise-seed), so the table is reproducible.",
    )
    sweep.add_argument("name", help="model recipe, see `he-models list`")
    sweep.add_argument(
        "--epsilons",
        default="0.5,1,3,8,none",
        help="comma-separated budgets; 'none' for no DP (default: %(default)s)",
    )
    sweep.add_argument(
        "--dp-delta", type=float, default=None, help="delta (default: the recipe's, or 1e-5)"
    )
    sweep.add_argument(
        "--max-grad-norm", type=float, default=None, help="clipping norm (default: the recipe's)"
    )
    sweep.add_argument(
        "--dp-noise-seed", type=int, default=None, help="noise seed (default: the recipe's, or 0)"
    )
    sweep.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    sweep.add_argument(
        "--split-seed", type=int, default=0, help="seed of the split (default: %(default)s)"
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="measure an artifact: original, polynomial and encrypted accuracy (or MSE)",
        description="Print the original network's accuracy (recorded in the manifest), the "
        "polynomial network's accuracy on the held-out split and the accuracy drop, encrypted "
        "accuracy and encrypted-vs-polynomial agreement, how often held-out pre-activations "
        "leave the calibrated ranges, and the differential-privacy guarantee (or its absence). "
        "For a regression artifact: MSE, MAE and R^2 instead of "
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


def _add_privacy_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("differential privacy (DP-SGD with Opacus)")
    group.add_argument(
        "--dp-epsilon",
        type=float,
        help=f"{what} with DP-SGD to this epsilon (RDP accountant); default: no DP, or a DP "
        "recipe's own budget",
    )
    group.add_argument(
        "--dp-delta",
        type=float,
        help=f"delta of the guarantee, in (0, 1) (default: {DEFAULT_DELTA:g})",
    )
    group.add_argument(
        "--max-grad-norm",
        type=float,
        help=f"per-record gradient clipping norm (default: {DEFAULT_MAX_GRAD_NORM:g})",
    )
    group.add_argument(
        "--dp-noise-seed",
        type=int,
        help="seed the noise to make the run reproducible; the manifest then says the seed is "
        "public, so the guarantee is a demonstration (default: a secret seed from `secrets`)",
    )


def _privacy(args: argparse.Namespace) -> Privacy:
    """Return the budget the DP options ask for, or the recipe's default if none is given.

    Raises:
        _UsageError: options contradict each other (checked before any training).
    """
    from models.privacy import PrivacyBudget, PrivacyError

    if args.dp_epsilon is None:
        given = [
            flag
            for flag, value in (
                ("--dp-delta", args.dp_delta),
                ("--max-grad-norm", args.max_grad_norm),
                ("--dp-noise-seed", args.dp_noise_seed),
            )
            if value is not None
        ]
        if given:
            raise _UsageError(f"{', '.join(given)}: only with --dp-epsilon, the budget to refine")
        return RECIPE_PRIVACY
    try:
        return PrivacyBudget(
            epsilon=args.dp_epsilon,
            delta=DEFAULT_DELTA if args.dp_delta is None else args.dp_delta,
            max_grad_norm=(
                DEFAULT_MAX_GRAD_NORM if args.max_grad_norm is None else args.max_grad_norm
            ),
            noise_seed=args.dp_noise_seed,
        )
    except PrivacyError as exc:
        raise _UsageError(str(exc)) from None


def _list() -> int:
    width = max(len(name) for name in RECIPES)
    for name, recipe in sorted(RECIPES.items()):
        shipped = "" if recipe.shipped else " (not shipped: `he-models train` builds it)"
        print(f"{name:<{width}}  {recipe.description}{shipped}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from he_service.privacy import privacy_lines
    from models.privacy import PrivacyError

    name = args.name
    privacy = _privacy(args)
    try:
        result = build(name, args.out, seed=args.seed, split_seed=args.split_seed, privacy=privacy)
    except (UnknownModelError, PrivacyError) as exc:
        raise _UsageError(str(exc)) from None
    except (ExportError, OSError) as exc:
        print(f"he-models: error: could not export {name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    s = result.summary
    print(
        f"{result.name}: original accuracy {s['original_accuracy']:.4f}, "
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
    for line in privacy_lines(result.privacy):
        print(line)
    print(f"wrote {result.path}")
    print(f"weights.npz sha256 {result.weights_sha256}")
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    from models.privacy import PrivacyBudget, PrivacyError

    recipe = RECIPES.get(args.name)
    if recipe is None:
        raise _UsageError(str(UnknownModelError(args.name)))
    base = recipe.default_privacy or PrivacyBudget(epsilon=1.0, noise_seed=0)
    budgets: list[tuple[str, PrivacyBudget | None]] = []
    try:
        for text in (part.strip() for part in args.epsilons.split(",")):
            if text.lower() == "none":
                budgets.append(("none (no DP)", None))
                continue
            try:
                epsilon = float(text)
            except ValueError:
                raise _UsageError(
                    f"--epsilons takes numbers or 'none' separated by commas, got {text!r}"
                ) from None
            budgets.append(
                (
                    f"{epsilon:g}",
                    PrivacyBudget(
                        epsilon=epsilon,
                        delta=base.delta if args.dp_delta is None else args.dp_delta,
                        max_grad_norm=(
                            base.max_grad_norm if args.max_grad_norm is None else args.max_grad_norm
                        ),
                        noise_seed=(
                            base.noise_seed if args.dp_noise_seed is None else args.dp_noise_seed
                        ),
                    ),
                )
            )
    except PrivacyError as exc:
        raise _UsageError(str(exc)) from None
    if not budgets:
        raise _UsageError("--epsilons names no budget")
    delta = next((b.delta for _, b in budgets if b is not None), base.delta)
    print(f"{recipe.name}: held-out accuracy per privacy budget (delta {delta:g}), plaintext")
    print("")
    print("| epsilon | noise multiplier | held-out accuracy | training seconds |")
    print("|---|---|---|---|")
    for label, chosen in budgets:
        try:
            trained = recipe.prepare(args.seed, args.split_seed, chosen)
        except PrivacyError as exc:
            raise _UsageError(str(exc)) from None
        except ExportError as exc:  # e.g. outputs past the engine's limit: nothing to tabulate
            print(f"he-models: error: {recipe.name} at epsilon {label}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        sigma = trained.manifest.get("privacy", {}).get("noise_multiplier")
        noise = "-" if sigma is None else f"{sigma:.3f}"
        print(
            f"| {label} | {noise} | {trained.test_accuracy:.4f} | {trained.train_seconds:.1f} |",
            flush=True,
        )
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
    tuning = _fine_tuning(args, shape, preprocessing)

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
    provenance = {
        "command": " ".join(command),
        "weights_sha256": _sha256(args.weights),
        "calibration_sha256": _sha256(args.calibration),
        "torch": torch_release(),
    }
    training, privacy = None, None
    if tuning is not None:
        network, training, privacy = tuning.run(network)
        provenance["fine_tune_data_sha256"] = _sha256(args.fine_tune_data)
        provenance["fine_tune_targets_sha256"] = _sha256(args.fine_tune_targets)
        print(
            f"fine-tuned on {training['fine_tune_samples']} samples for "
            f"{training['fine_tuning']['epochs']} epochs"
            + ("" if privacy is None else f" with DP-SGD (epsilon {privacy['epsilon']:g})")
        )
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
            training=training,
            provenance=provenance,
            task=args.task,
            key_budget_bytes=key_budget,
            privacy=privacy,
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


def _fine_tuning(
    args: argparse.Namespace, shape: tuple[int, ...], preprocessing: Mapping[str, Any]
) -> FineTuning | None:
    """Read the fine-tuning options and data, and plan the DP noise, before any conversion.

    Raises:
        _UsageError: options contradict each other, the files are unreadable or do not fit
            the model, or no noise multiplier meets the budget.
    """
    from models.finetune import FineTuning
    from models.privacy import PrivacyError

    privacy = _privacy(args)
    if (args.fine_tune_data is None) != (args.fine_tune_targets is None):
        raise _UsageError("--fine-tune-data and --fine-tune-targets go together")
    if args.fine_tune_data is None:
        if privacy is not RECIPE_PRIVACY:
            raise _UsageError(
                "--dp-epsilon applies to fine-tuning: give --fine-tune-data and "
                "--fine-tune-targets (conversion itself trains nothing)"
            )
        return None
    if args.fine_tune_epochs < 1 or args.fine_tune_batch_size < 1 or args.fine_tune_lr <= 0:
        raise _UsageError(
            "--fine-tune-epochs, --fine-tune-batch-size and --fine-tune-lr must be > 0"
        )
    try:
        raw = np.load(args.fine_tune_data, allow_pickle=False)
        targets = np.load(args.fine_tune_targets, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise _UsageError(f"cannot read the fine-tuning data: {exc}") from None
    if (
        len(raw) == 0
        or len(raw) != len(targets)
        or int(np.prod(raw.shape[1:])) != int(np.prod(shape))
    ):
        raise _UsageError(
            f"--fine-tune-data {raw.shape} and --fine-tune-targets {targets.shape} must hold the "
            f"same number of samples shaped {list(shape)}"
        )
    try:
        return FineTuning.plan(
            preprocess_batch(raw, preprocessing, shape),
            targets,
            epochs=args.fine_tune_epochs,
            batch_size=args.fine_tune_batch_size,
            lr=args.fine_tune_lr,
            task=args.task,
            privacy=None if privacy is RECIPE_PRIVACY else privacy,
            dataset=f"{args.fine_tune_data.name} (sha256 {_sha256(args.fine_tune_data)})",
        )
    except PrivacyError as exc:
        raise _UsageError(str(exc)) from None


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
    from he_service.privacy import privacy_lines
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
    # load_artifact checked the claim: what is printed is what the card states.
    for line in privacy_lines(manifest.get("privacy")):
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
            return _train(args)
        if args.command == "sweep":
            return _sweep(args)
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
