"""Turn a torch model into the ordered chain of layers its ``forward`` runs.

``torch.fx`` traces the model's ``forward`` symbolically. ``nn.Sequential`` containers are
traced through; every other submodule is a leaf, seen as one call, so a custom module with its
own ``forward`` is one (unsupported) step, named by its path. Calls written directly in a
``forward`` (``x.flatten(1)``, ``torch.relu(x)``, ``x * x``) are recognised too. The network
must be a straight chain: each step consumes exactly the previous step's output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from models.architectures import Square
from models.polynomial import PolyActivation
from models.problems import Problem

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_LAYERS",
    "FunctionalActivation",
    "Step",
    "describe",
    "trace",
]

# Element-wise activations replaced by fitted polynomials.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Mish,
)
_DROPPED: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Identity,
)
SUPPORTED_LAYERS = (
    "Conv2d (zero padding), Linear, BatchNorm1d/BatchNorm2d (folded into the neighbouring "
    "Conv2d/Linear), AvgPool2d, AdaptiveAvgPool2d (when the output size divides the input), "
    "Flatten, Dropout, Identity, activations "
    + ", ".join(cls.__name__ for cls in ACTIVATIONS)
    + ", PReLU with one parameter, models.Square (x*x), models.PolyActivation"
)
_REBUILD = (
    "rebuild it from supported layers (Conv2d, Linear, BatchNorm, AvgPool2d, Flatten, Dropout, "
    "element-wise activations such as ReLU), or call those layers directly in the parent's "
    "forward"
)


@dataclass
class Step:
    """One layer of the chain: ``kind`` is what the converter does with it.

    Kinds: ``conv``, ``linear``, ``bn``, ``pool`` (AvgPool2d), ``adaptive_pool``, ``flatten``,
    ``drop`` (removed), ``act`` (fitted), ``square`` (x*x, kept exact), ``poly`` (already a
    polynomial), ``unsupported``. ``module`` computes the step on a batch (for functional calls,
    an equivalent module); it is the model's own module, never modified here.
    """

    path: str
    kind: str
    module: nn.Module | None
    label: str
    problem: Problem | None = None


class FunctionalActivation(nn.Module):
    """An activation written as a call in ``forward`` (``torch.relu(x)``), as a module."""

    def __init__(
        self,
        function: Callable[..., torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
    ) -> None:
        super().__init__()
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the wrapped function.

        Args:
            x: any tensor.

        Returns:
            The activation of ``x``.
        """
        return self.function(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return self.name


def describe(module: nn.Module) -> str:
    """Return a one-line description such as ``Conv2d(1, 4, kernel_size=(7, 7), stride=(3, 3))``.

    Args:
        module: any module.

    Returns:
        The class name and its ``extra_repr``.
    """
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.Sequential)


def _module_problem(path: str, module: nn.Module) -> tuple[str, Problem | None]:
    """Classify a module call; return its kind and, if unsupported, why."""
    label = describe(module)

    def refuse(reason: str, fix: str) -> tuple[str, Problem]:
        return "unsupported", Problem(path, label, reason, fix)

    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return refuse(
                f"padding_mode={module.padding_mode!r} is not a linear map of zero-padded input",
                "use padding_mode='zeros'",
            )
        if isinstance(module.padding, str) and module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                return refuse(
                    "padding='same' with an even kernel pads unevenly, the engine pads "
                    "symmetrically",
                    "use an odd kernel size or explicit padding",
                )
        return "conv", None
    if isinstance(module, nn.Linear):
        return "linear", None
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            return refuse(
                "track_running_stats=False: there are no running statistics to fold into the "
                "neighbouring layer",
                "train with track_running_stats=True",
            )
        return "bn", None
    if isinstance(module, nn.AvgPool2d):
        if module.ceil_mode:
            return refuse(
                "ceil_mode=True averages partial windows with a different divisor",
                "use ceil_mode=False",
            )
        padded = module.padding not in (0, (0, 0))
        if padded and not module.count_include_pad:
            return refuse(
                "count_include_pad=False divides edge windows by a different count",
                "use count_include_pad=True or no padding",
            )
        return "pool", None
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return "adaptive_pool", None
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            return refuse(
                f"Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}) does not "
                "flatten one sample into a vector",
                "use nn.Flatten() (start_dim=1, end_dim=-1)",
            )
        return "flatten", None
    if isinstance(module, _DROPPED):
        return "drop", None
    if isinstance(module, ACTIVATIONS):
        return "act", None
    if isinstance(module, nn.PReLU):
        if module.num_parameters != 1:
            return refuse(
                "PReLU with one slope per channel would need one polynomial per channel",
                "use nn.PReLU() (one parameter) or nn.LeakyReLU",
            )
        return "act", None
    if isinstance(module, Square):
        return "square", None
    if isinstance(module, PolyActivation):
        return "poly", None
    if isinstance(module, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d | nn.FractionalMaxPool2d):
        return refuse(
            "max pooling compares values, and CKKS can only add and multiply",
            "use nn.AvgPool2d with the same kernel_size, stride and padding",
        )
    if isinstance(module, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d):
        return refuse(
            "max pooling compares values, and CKKS can only add and multiply",
            "use nn.AdaptiveAvgPool2d with the same output size",
        )
    if isinstance(module, nn.LPPool1d | nn.LPPool2d):
        return refuse("power-average pooling takes a root of the data", "use nn.AvgPool2d")
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        return refuse(
            "a recurrent layer loops over time steps through gates (sigmoid/tanh of products of "
            "its own state), which is not a fixed chain of additions and multiplications",
            "rebuild the network from Conv2d/Linear layers over a fixed-size input",
        )
    if isinstance(module, nn.MultiheadAttention | nn.Transformer):
        return refuse(
            "attention needs softmax (exponentials, a division and a max), which is not "
            "expressible as additions and multiplications",
            "rebuild the network from Conv2d/Linear layers with supported activations",
        )
    if isinstance(
        module,
        nn.TransformerEncoderLayer
        | nn.TransformerDecoderLayer
        | nn.TransformerEncoder
        | nn.TransformerDecoder,
    ):
        return refuse(
            "a transformer layer uses softmax attention and LayerNorm (divisions by data-"
            "dependent values), which are not expressible as additions and multiplications",
            "rebuild the network from Conv2d/Linear layers with supported activations",
        )
    if isinstance(module, nn.Softmax | nn.LogSoftmax | nn.Softmin | nn.Softmax2d):
        return refuse(
            "softmax needs exponentials and a division over the whole output",
            "remove it: the argmax of the logits is the same, and the client can apply "
            "softmax after decrypting",
        )
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.LocalResponseNorm | nn.RMSNorm):
        return refuse(
            "it divides each sample by its own statistics, which depend on the encrypted data",
            "use BatchNorm1d/BatchNorm2d, which folds into the neighbouring layer",
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return refuse(
            "it divides each sample by its own statistics, which depend on the encrypted data",
            "use BatchNorm2d, which folds into the neighbouring layer",
        )
    if isinstance(module, nn.Conv1d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d):
        return refuse(
            "only 2-D convolutions (nn.Conv2d) on (channels, height, width) inputs are supported",
            "use nn.Conv2d (or nn.Linear on a flattened input)",
        )
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return refuse(
            "a table lookup by index is not an arithmetic function of the input",
            "one-hot encode the input on the client and use nn.Linear",
        )
    if type(module).__module__.startswith(("torch.nn", "torch.ao.nn")):
        return refuse(f"{type(module).__name__} is not supported", _REBUILD)
    return refuse(
        f"custom module {type(module).__qualname__} with its own forward(): the converter cannot "
        "see inside it, so it cannot show that it only adds and multiplies",
        _REBUILD,
    )


_FUNCTIONAL_ACTIVATIONS: dict[Any, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.gelu: "gelu",
    F.silu: "silu",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.celu: "celu",
    F.selu: "selu",
    F.softplus: "softplus",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish",
    F.mish: "mish",
}
_METHOD_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
_FUNCTIONAL_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_FUNCTIONAL_MAX = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d}
_FUNCTIONAL_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
# Keyword arguments that change nothing in eval mode or on a copy.
_IGNORED_KWARGS = {"inplace", "training"}


def _callable_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}()"
    module = getattr(target, "__module__", None) or "torch"
    name = getattr(target, "__name__", repr(target))
    if module.startswith("torch.nn.functional"):
        module = "F"
    elif module.startswith("torch") or module == "_operator":
        module = "torch" if module.startswith("torch") else "operator"
    return f"{module}.{name}()"


def _is_square(node: fx.Node) -> bool:
    args = node.args
    if node.op == "call_function":
        if node.target in (operator.mul, torch.mul) and len(args) == 2:
            return args[0] is args[1]
        if node.target in (operator.pow, torch.pow) and len(args) == 2:
            return bool(args[1] == 2)
        return node.target is torch.square and len(args) == 1
    if node.op == "call_method":
        if node.target == "mul" and len(args) == 2:
            return args[0] is args[1]
        if node.target == "pow" and len(args) == 2:
            return bool(args[1] == 2)
        return node.target == "square" and len(args) == 1
    return False


def _is_flatten(node: fx.Node, helpers: set[fx.Node]) -> bool | None:
    """Return True for a flatten to (batch, -1), False for another reshape, None otherwise."""
    target = node.target
    if (node.op == "call_function" and target is torch.flatten) or (
        node.op == "call_method" and target == "flatten"
    ):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return bool(start == 1 and end == -1)
    if node.op == "call_method" and target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return bool(len(shape) == 2 and shape[0] in helpers and shape[1] == -1)
    return None


def _is_helper(node: fx.Node, helpers: set[fx.Node]) -> bool:
    """Shape arithmetic (``x.size(0)``, ``x.shape[0]``) that yields no tensor."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function":
        if node.target is getattr and node.args[1:] == ("shape",):
            return True
        if node.target is operator.getitem and node.args[0] in helpers:
            return True
        if node.target is len:
            return True
    return False


def _function_step(node: fx.Node, helpers: set[fx.Node]) -> Step:
    name = node.name
    label = _callable_name(node.target) + " in forward"
    target = node.target
    extra_kwargs = {k: v for k, v in node.kwargs.items() if k not in _IGNORED_KWARGS}

    def refuse(reason: str, fix: str) -> Step:
        return Step(name, "unsupported", None, label, Problem(name, label, reason, fix))

    if _is_square(node):
        return Step(name, "square", Square(), label)
    flatten = _is_flatten(node, helpers)
    if flatten is True:
        return Step(name, "flatten", nn.Flatten(), label)
    if flatten is False:
        return refuse(
            "only flattening each sample into a vector (start_dim=1) is supported",
            "use nn.Flatten() or x.flatten(1)",
        )
    if node.op == "call_method" and target == "contiguous":
        return Step(name, "drop", nn.Identity(), label)
    function: Callable[..., torch.Tensor] | None = None
    if node.op == "call_function" and target in _FUNCTIONAL_ACTIVATIONS:
        function = target  # type: ignore[assignment]
    elif node.op == "call_method" and target in _METHOD_ACTIVATIONS:
        function = _METHOD_ACTIVATIONS[str(target)]
    if function is not None:
        # A trailing bool is `inplace`, which changes nothing on the converter's copy.
        args = tuple(a for a in node.args[1:] if not isinstance(a, bool))
        if any(isinstance(a, fx.Node) for a in (*args, *extra_kwargs.values())):
            return refuse(
                "activation called with arguments computed from the data",
                "use the nn module form of the activation",
            )
        shown = ", ".join(
            ["x", *(repr(a) for a in args), *(f"{k}={v!r}" for k, v in extra_kwargs.items())]
        )
        activation = FunctionalActivation(
            function, args, extra_kwargs, f"{_callable_name(target)[:-2]}({shown})"
        )
        return Step(name, "act", activation, activation.name)
    if node.op == "call_function" and target in _FUNCTIONAL_DROPOUT:
        return Step(name, "drop", nn.Identity(), label)
    if node.op == "call_function" and target in _FUNCTIONAL_MAX:
        return refuse(
            "max pooling compares values, and CKKS can only add and multiply",
            "use an nn.AvgPool2d module with the same kernel_size, stride and padding",
        )
    if node.op == "call_function" and target in _FUNCTIONAL_SOFTMAX:
        return refuse(
            "softmax needs exponentials and a division over the whole output",
            "remove it: the argmax of the logits is the same, and the client can apply "
            "softmax after decrypting",
        )
    if node.op == "call_function" and target in (F.linear, F.conv2d, F.batch_norm):
        return refuse(
            "a layer written as a functional call with its own weights cannot be folded",
            "use the nn.Linear / nn.Conv2d / nn.BatchNorm module instead",
        )
    if node.op == "call_function" and target is F.avg_pool2d:
        return refuse("functional pooling is not recognised", "use an nn.AvgPool2d module")
    return refuse(
        f"{_callable_name(target)} is not a supported layer or operation",
        "express the network as a chain of supported layers: " + SUPPORTED_LAYERS,
    )


def trace(model: nn.Module) -> tuple[list[Step], list[Problem]]:
    """Trace ``model.forward`` into a chain of steps.

    Args:
        model: the torch model (not modified).

    Returns:
        The steps in execution order and the problems of the chain itself (a skip connection,
        several inputs, an untraceable forward); problems of single layers are on their steps.
    """
    if not isinstance(model, nn.Sequential) and not list(model.children()):
        # A bare layer such as nn.Linear(4, 2): its forward is a functional call.
        path = type(model).__name__.lower()
        kind, problem = _module_problem(path, model)
        return [Step(path, kind, model, describe(model), problem)], []
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        return [], [
            Problem(
                "forward",
                type(model).__name__,
                f"forward() cannot be traced symbolically ({type(exc).__name__}: {exc})",
                "write forward as a straight sequence of layer calls without Python control "
                "flow on tensor values, or use nn.Sequential",
            )
        ]
    steps: list[Step] = []
    problems: list[Problem] = []
    helpers: set[fx.Node] = set()
    by_node: dict[fx.Node, Step] = {}
    # `out, state = self.lstm(x)` gives several getitem nodes that all stand for the output.
    aliases: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if aliases:
                problems.append(
                    Problem(
                        node.name,
                        "forward argument",
                        "forward() takes more than one input",
                        "take a single tensor input",
                    )
                )
            aliases = {node}
            continue
        if node.op == "output":
            result = node.args[0]
            if result not in aliases:
                problems.append(
                    Problem(
                        "forward",
                        type(model).__name__,
                        "forward() returns something other than the last layer's output "
                        "(a tuple, a dict or an earlier value)",
                        "return the output of the last layer only",
                    )
                )
            continue
        if _is_helper(node, helpers):
            helpers.add(node)
            continue
        if node.op == "get_attr":
            # A parameter used directly: the call that uses it is refused with the reason.
            helpers.add(node)
            continue
        inputs = [n for n in node.all_input_nodes if n not in helpers]
        source = by_node.get(inputs[0]) if len(inputs) == 1 else None
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and source is not None
            and source.kind == "unsupported"
        ):
            # The unsupported layer is already reported; its outputs stand in for it.
            by_node[node] = source
            aliases.add(node)
            continue
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            kind, problem = _module_problem(str(node.target), module)
            step = Step(str(node.target), kind, module, describe(module), problem)
        else:
            step = _function_step(node, helpers)
        if not inputs or not set(inputs) <= aliases:
            names = ", ".join(n.name for n in inputs) or "no tensor"
            problems.append(
                Problem(
                    step.path,
                    step.label,
                    f"its input is {names}, not just the previous layer's output: only straight "
                    "chains are supported (no skip connections, concatenations, several inputs "
                    "or arithmetic between tensors)",
                    "restructure the network as a single chain of layers",
                )
            )
        steps.append(step)
        by_node[node] = step
        aliases = {node}
    return steps, problems
