"""Lower GroupNorm (private training's BatchNorm) to a fixed per-channel affine map for CKKS.

GroupNorm divides each sample by its own standard deviation: a division, which ciphertexts
cannot do. Once training is over it is replaced by the BatchNorm (eval mode) that uses, for each
channel, the average over public or held-out samples of the group statistics GroupNorm would
compute, with GroupNorm's own scale and shift. The converter then folds that BatchNorm into the
neighbouring layer like any other.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.training import to_tensor

__all__ = ["lower_group_norms"]


def _replacement(norm: nn.GroupNorm, inputs: torch.Tensor) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """Return the BatchNorm that applies ``norm``'s average group statistics on ``inputs``."""
    n, channels = inputs.shape[:2]
    grouped = inputs.reshape(n, norm.num_groups, -1).to(torch.float64)
    # Per sample and group, as GroupNorm computes them (biased variance), then averaged.
    mean = grouped.mean(dim=2).mean(dim=0)
    var = grouped.var(dim=2, unbiased=False).mean(dim=0)
    per_group = channels // norm.num_groups
    bn: nn.BatchNorm1d | nn.BatchNorm2d = (
        nn.BatchNorm1d(channels, eps=norm.eps, affine=norm.affine)
        if inputs.dim() == 2
        else nn.BatchNorm2d(channels, eps=norm.eps, affine=norm.affine)
    )
    bn = bn.to(torch.float64)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.copy_(mean.repeat_interleave(per_group))
        bn.running_var.copy_(var.repeat_interleave(per_group))
        if norm.affine:
            bn.weight.copy_(norm.weight.to(torch.float64))
            bn.bias.copy_(norm.bias.to(torch.float64))
    return bn.eval()


def _inputs_of(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return what ``module`` receives when ``model`` runs on ``x``."""
    seen: list[torch.Tensor] = []

    def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach())

    handle = module.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def lower_group_norms(model: nn.Module, x: np.ndarray | torch.Tensor) -> nn.Module:
    """Replace every GroupNorm of ``model`` by a BatchNorm with statistics measured on ``x``.

    The statistics of each GroupNorm are measured on its inputs when ``x`` runs through the
    network with the earlier GroupNorms already replaced, so every replacement sees the values
    the lowered network produces.

    Args:
        model: the trained network; modified in place (float64 afterwards) and returned.
        x: preprocessed samples that are not private training records (held-out or public).

    Returns:
        The network without GroupNorm, in eval mode.
    """
    model = model.to(torch.float64).eval()
    inputs = to_tensor(x, torch.float64)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.GroupNorm):
                continue
            setattr(parent, name, _replacement(child, _inputs_of(child, model, inputs)))
    return model
