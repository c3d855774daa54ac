"""Turn a torch model into the nested chain of layers its ``forward`` runs.

``torch.fx`` traces the model's ``forward`` symbolically. Standard torch layers (``nn.Conv2d``,
``nn.ReLU``, ...) and the converter's own ``Square``/``PolyActivation`` are leaves, seen as one
call each; ``nn.Sequential`` and every user module (a ResNet ``BasicBlock``, say) are traced
through, so what their ``forward`` calls is checked one call at a time and named by its module
path (``layer1.0.conv1``, ``layer1.0.add``). Calls written directly in a ``forward``
(``x.flatten(1)``, ``torch.relu(x)``, ``x * x``) are recognised too.

The network must be series-parallel: a chain of layers in which a residual join
``y = f(x) + g(x)`` (or ``f(x) - g(x)``) may stand for one step, its branches being chains
themselves that start at the same value ``x`` (an empty branch is ``x`` itself). Each join's
fork is its immediate dominator in the graph; a value that is read both inside a block and
outside it, concatenations, products of two tensors and attention are refused with the node
that does it.
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
    "is_leaf",
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
    + ", PReLU with one parameter, models.Square (x*x), models.PolyActivation, and residual "
    "sums of branches (x + f(x), g(x) + f(x), g(x) - f(x))"
)
_REBUILD = (
    "rebuild it from supported layers (Conv2d, Linear, BatchNorm, AvgPool2d, Flatten, Dropout, "
    "element-wise activations such as ReLU), or call those layers directly in the parent's "
    "forward"
)


@dataclass
class Step:
    """One step of the chain: ``kind`` is what the converter does with it.

    Kinds: ``conv``, ``linear``, ``bn``, ``pool`` (AvgPool2d), ``adaptive_pool``, ``flatten``,
    ``drop`` (removed), ``act`` (fitted), ``square`` (x*x, kept exact), ``poly`` (already a
    polynomial), ``add`` (a residual join: the sum of ``branches``, each a chain applied to
    the same input, multiplied by its entry of ``signs``), ``unsupported``. ``module``
    computes the step on a batch (for functional calls, an equivalent module; None for a
    join); it is the model's own module, never modified here. An unsupported join keeps its
    branches too, so that problems inside them are reported as well.
    """

    path: str
    kind: str
    module: nn.Module | None
    label: str
    problem: Problem | None = None
    branches: tuple[list[Step], ...] = ()
    signs: tuple[int, ...] = ()


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


def is_leaf(module: nn.Module) -> bool:
    """Return True if the tracer sees ``module`` as one call rather than tracing its forward.

    Torch's own layers are leaves (a subclass that keeps torch's ``forward`` too), except
    ``nn.Sequential``; so are ``Square`` and ``PolyActivation``. Everything else is traced
    through, so that the layers a user module calls are checked one by one.

    Args:
        module: any module.

    Returns:
        Whether the module is a leaf.
    """
    if isinstance(module, Square | PolyActivation):
        return True
    if isinstance(module, nn.Sequential):
        return False
    return str(getattr(type(module).forward, "__module__", "")).startswith("torch.")


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        # The innermost module whose forward raised: where an untraceable call is.
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


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
    return refuse(f"{type(module).__name__} is not supported", _REBUILD)


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


def _function_step(node: fx.Node, path: str, helpers: set[fx.Node]) -> Step:
    name = path
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
    if (node.op == "call_method" and target == "mean") or target is torch.mean:
        return refuse(
            "a mean written in forward is not recognised",
            "for a global average over height and width use nn.AdaptiveAvgPool2d(1) and "
            "nn.Flatten()",
        )
    if _arithmetic(node) is not None:
        return refuse(
            "arithmetic with a constant is not a layer of the artifact",
            "fold the constant into the weights and bias of the neighbouring Conv2d/Linear",
        )
    return refuse(
        f"{_callable_name(target)} is not a supported layer or operation",
        "express the network as a chain of supported layers: " + SUPPORTED_LAYERS,
    )


# Element-wise arithmetic between tensors: the sum of two branches is a residual join.
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub, torch.subtract}
_ADD_METHODS = {"add", "add_"}
_SUB_METHODS = {"sub", "sub_", "subtract", "subtract_"}
_PRODUCT_FUNCTIONS = {
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    operator.matmul,
    torch.mul,
    torch.multiply,
    torch.div,
    torch.true_divide,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.einsum,
    F.bilinear,
}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_", "matmul", "mm", "bmm"}
_CONCATENATIONS = {
    torch.cat,
    torch.concat,
    torch.concatenate,
    torch.stack,
    torch.hstack,
    torch.vstack,
    torch.dstack,
    torch.column_stack,
}
_ATTENTION = {F.scaled_dot_product_attention, F.multi_head_attention_forward}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _arithmetic(node: fx.Node) -> str | None:
    """Return ``add``, ``sub`` or ``product`` for element-wise arithmetic, else None."""
    target = node.target
    if node.op == "call_function":
        if target in _ADD_FUNCTIONS:
            return "add"
        if target in _SUB_FUNCTIONS:
            return "sub"
        if target in _PRODUCT_FUNCTIONS:
            return "product"
    if node.op == "call_method":
        if target in _ADD_METHODS:
            return "add"
        if target in _SUB_METHODS:
            return "sub"
        if target in _PRODUCT_METHODS:
            return "product"
    return None


def _node_path(node: fx.Node) -> str:
    """Return a module call's path, or a call's fx name under the module whose forward made it."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        module_path = next(reversed(stack.values()))[0]
        return f"{module_path}.{node.name}"
    return node.name


def _join_step(
    node: fx.Node, path: str, inputs: list[fx.Node], branches: tuple[list[Step], ...]
) -> Step:
    """Classify a call that combines several tensors; only sums and differences are joins."""
    label = _callable_name(node.target) + " in forward"

    def refuse(reason: str, fix: str) -> Step:
        return Step(path, "unsupported", None, label, Problem(path, label, reason, fix), branches)

    kind = _arithmetic(node)
    if kind in ("add", "sub"):
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if alpha != 1:
            return refuse(
                "alpha scales one branch by a constant",
                "write the sum without alpha (x + f(x)) and scale inside the branch's last "
                "Conv2d/Linear",
            )
        signs = (1, -1) if kind == "sub" else (1, 1)
        return Step(path, "add", None, label, branches=branches, signs=signs)
    if node.op == "call_function" and node.target in _CONCATENATIONS:
        return refuse(
            "concatenation of branches is not a layer of the artifact (only sums of branches are)",
            "sum the branches instead (y = g(x) + f(x)); a Linear/Conv2d over a concatenation "
            "equals the sum of one Linear/Conv2d per branch",
        )
    if node.op == "call_function" and node.target in _ATTENTION:
        return refuse(
            "attention needs softmax (exponentials, a division and a max) and products of two "
            "tensors computed from the input",
            "rebuild the network from Conv2d/Linear layers with supported activations and "
            "residual sums",
        )
    if kind == "product":
        return refuse(
            "it multiplies (or divides) two tensors computed from the input (a gate, an "
            "attention score, a product of branches): the artifact multiplies values only by "
            "fixed weights and inside polynomial activations",
            "combine branches by a sum (y = g(x) + f(x)), or use an activation such as "
            "models.Square for x * x",
        )
    names = ", ".join(n.name for n in inputs)
    return refuse(
        f"{_callable_name(node.target)} combines several tensors ({names}); only sums and "
        "differences of residual branches are supported",
        "combine branches by a sum (y = g(x) + f(x))",
    )


def _overwritten(node: fx.Node, model: nn.Module) -> fx.Node | None:
    """Return the tensor an in-place call overwrites (``x.add_(y)``, ``relu(x, inplace=True)``)."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    target = node.target
    if node.op == "call_method":
        name = str(target)
        return first if name.endswith("_") and not name.startswith("_") else None
    if node.op == "call_module":
        in_place = getattr(model.get_submodule(str(target)), "inplace", False) is True
        return first if in_place else None
    if node.op == "call_function":
        if target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return first
        if target in _FUNCTIONAL_ACTIVATIONS and any(a is True for a in node.args[1:]):
            return first
    return None


_ROOT = "root"  # the immediate dominator of values that depend on no input


class _Builder:
    """Decompose a traced graph into a nested chain of steps, collecting every problem."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.problems: list[Problem] = []
        self.helpers: set[fx.Node] = set()
        self.order: dict[fx.Node, int] = {}
        self.inputs: dict[fx.Node, list[fx.Node]] = {}
        self.steps: dict[fx.Node, Step] = {}
        self.aliases: set[fx.Node] = set()
        self.joins: set[fx.Node] = set()
        self.visited: set[fx.Node] = set()
        self.placeholders: list[fx.Node] = []
        self.result: fx.Node | None = None
        for index, node in enumerate(graph.nodes):
            self.order[node] = index
            self._classify(node)

    def _classify(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.placeholders:
                self.problems.append(
                    Problem(
                        node.name,
                        "forward argument",
                        "forward() takes more than one input",
                        "take a single tensor input",
                    )
                )
            self.placeholders.append(node)
            return
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                self.problems.append(
                    Problem(
                        "forward",
                        type(self.model).__name__,
                        "forward() returns something other than one tensor (a tuple or a dict)",
                        "return the output of the last layer only",
                    )
                )
                tensors = node.all_input_nodes
                result = tensors[0] if tensors else None
            self.result = result
            return
        if _is_helper(node, self.helpers) or node.op == "get_attr":
            # A parameter used directly is a helper: the call that uses it is refused.
            self.helpers.add(node)
            return
        tensors = [n for n in node.all_input_nodes if n not in self.helpers]
        source = self.steps.get(tensors[0]) if len(tensors) == 1 else None
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and source is not None
            and source.kind == "unsupported"
        ):
            # `out, state = self.lstm(x)`: the unsupported layer is already reported.
            self.inputs[node] = tensors
            self.aliases.add(node)
            self.steps[node] = source
            return
        path = _node_path(node)
        arithmetic = _arithmetic(node)
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a not in self.helpers]
        if arithmetic in ("add", "sub") and len(operands) == 2 and not _is_square(node):
            # x + x is a join of two identity branches, so the operands, not the unique
            # inputs, are the branches.
            self.inputs[node] = operands
            self.joins.add(node)
        elif len(tensors) >= 2 and not _is_square(node):
            self.inputs[node] = tensors
            self.joins.add(node)
        else:
            self.inputs[node] = tensors
            if node.op == "call_module":
                module = self.model.get_submodule(str(node.target))
                kind, problem = _module_problem(path, module)
                self.steps[node] = Step(path, kind, module, describe(module), problem)
            else:
                self.steps[node] = _function_step(node, path, self.helpers)
            if not tensors:
                step = self.steps[node]
                self.problems.append(
                    Problem(
                        step.path,
                        step.label,
                        "it takes no tensor computed from the input (a constant or a parameter "
                        "used directly)",
                        "compute every layer from the network's input",
                    )
                )
        self._check_in_place(node)

    def _check_in_place(self, node: fx.Node) -> None:
        overwritten = _overwritten(node, self.model)
        if overwritten is None:
            return
        later = [
            _node_path(user)
            for user in overwritten.users
            if user is not node and self.order.get(user, len(self.order) + 1) > self.order[node]
        ]
        if later:
            path = _node_path(node)
            value = _node_path(overwritten)
            self.problems.append(
                Problem(
                    path,
                    _callable_name(node.target) + " in forward"
                    if node.op != "call_module"
                    else describe(self.model.get_submodule(str(node.target))),
                    f"it overwrites {value} in place, and {', '.join(later)} read {value} "
                    "afterwards: the traced graph cannot see that change",
                    "assign the result instead (out = out + identity, out = torch.relu(out)) and "
                    "use it",
                )
            )

    def _dominators(self) -> dict[fx.Node, fx.Node | str]:
        """Return each value's immediate dominator (Cooper, Harvey and Kennedy, on a DAG)."""
        idom: dict[fx.Node, fx.Node | str] = {}

        def index(node: fx.Node | str) -> int:
            return -1 if isinstance(node, str) else self.order[node]

        def intersect(a: fx.Node | str, b: fx.Node | str) -> fx.Node | str:
            while a is not b:
                while index(a) > index(b):
                    a = idom[a]  # type: ignore[index]
                while index(b) > index(a):
                    b = idom[b]  # type: ignore[index]
            return a

        for node in self.order:
            if node in self.helpers or node.op == "output":
                continue
            preds = self.inputs.get(node, [])
            if not preds:
                idom[node] = _ROOT
                continue
            dominator: fx.Node | str = preds[0]
            for pred in preds[1:]:
                dominator = intersect(pred, dominator)
            idom[node] = dominator
        return idom

    def build(self) -> list[Step]:
        """Return the nested chain from the first input to the result."""
        if self.result is None:
            return []
        self.idom = self._dominators()
        stop: fx.Node | str = self.placeholders[0] if self.placeholders else _ROOT
        return self._chain(self.result, stop)

    def _chain(self, end: fx.Node, stop: fx.Node | str) -> list[Step]:
        steps: list[Step] = []
        node: fx.Node | str = end
        while node is not stop and not isinstance(node, str):
            if node in self.visited:
                self._shared(node)
                break
            self.visited.add(node)
            preds = self.inputs.get(node, [])
            if node in self.joins:
                fork = self.idom[node]
                branches = tuple(self._chain_or_empty(pred, fork) for pred in preds)
                steps.append(_join_step(node, _node_path(node), preds, branches))
                node = fork
                continue
            if node not in self.aliases and node in self.steps:
                steps.append(self.steps[node])
            if not preds:
                break
            node = preds[0]
        steps.reverse()
        return steps

    def _chain_or_empty(self, start: fx.Node, fork: fx.Node | str) -> list[Step]:
        return [] if start is fork else self._chain(start, fork)

    def _shared(self, node: fx.Node) -> None:
        step = self.steps.get(node)
        users = ", ".join(_node_path(user) for user in node.users)
        self.problems.append(
            Problem(
                step.path if step is not None else _node_path(node),
                step.label if step is not None else node.name,
                f"its output is read by {users}, which are not the branches of one residual "
                "block: only the input of a block may be shared by its branches, every other "
                "value must stay inside one branch (no dense or U-Net style skips)",
                "restructure the network into nested blocks y = x + f(x) / y = g(x) + f(x)",
            )
        )


def trace(model: nn.Module) -> tuple[list[Step], list[Problem]]:
    """Trace ``model.forward`` into a nested chain of steps.

    Args:
        model: the torch model (not modified).

    Returns:
        The steps in execution order (residual joins hold their branches) and the problems of
        the graph itself (a value shared outside its block, an in-place change, several
        inputs, an untraceable forward); problems of single layers and joins are on their
        steps.
    """
    if is_leaf(model):
        # A bare layer such as nn.Linear(4, 2): its forward is a functional call.
        path = type(model).__name__.lower()
        kind, problem = _module_problem(path, model)
        return [Step(path, kind, model, describe(model), problem)], []
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        where = tracer.failed_in
        module = model.get_submodule(where) if where else model
        return [], [
            Problem(
                where or "forward",
                type(module).__name__,
                f"forward() cannot be traced symbolically ({type(exc).__name__}: {exc})",
                "write forward as a straight sequence of layer calls without Python control "
                "flow on tensor values, or use nn.Sequential",
            )
        ]
    builder = _Builder(model, graph)
    steps = builder.build()
    return steps, builder.problems
