"""Batch normalization folded into the convolution before it, for inference.

In eval mode a batch-norm layer is the affine map y = γ (z − μ) / √(σ² + ε) + β with its
running statistics μ, σ² fixed, so a convolution z = W * x + b followed by it is the single
convolution with weights W·s and bias (b − μ)·s + β, where s = γ / √(σ² + ε) per output
channel (Ioffe & Szegedy 2015; the folding every inference engine does). The two compute
the same function; in floating point they differ by rounding only (about 1e-6 relative in
fp32), which is why the smoothed classifier of the folded model is, for every purpose,
the smoothed classifier of the original.

Only a convolution whose output feeds nothing but the batch-norm layer is folded, and only
a convolution module called once (a shared module would change its other uses). A batch
norm before a convolution (pre-activation networks) is left as it is: with zero padding it
cannot be folded exactly. The model is found by ``torch.fx`` symbolic tracing; a model
that does not trace is returned unfolded, with a warning.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldingWarning(UserWarning):
    """Batch normalization could not be folded; the model runs as it is."""


def count_batchnorm(model: nn.Module) -> int:
    """The number of batch-norm layers in ``model`` that track running statistics."""
    return sum(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def folded_convolution(conv: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``conv`` computing bn(conv(x)) in eval mode. The products are formed in
    float64 and rounded once to the convolution's dtype."""
    fused = copy.deepcopy(conv)
    weight = conv.weight.detach().double()
    scale = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
    shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(scale)
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    dtype = conv.weight.dtype
    fused.weight = nn.Parameter((weight * scale.view(shape)).to(dtype), requires_grad=False)
    fused.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(dtype),
                              requires_grad=False)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable (convolution, batch norm) pair
    replaced by one convolution. ``model`` itself is not modified. Returns an
    ``torch.fx.GraphModule``, or an unfolded eval-mode copy (with a ``FoldingWarning``) when
    the model cannot be traced. A model that does not trace whole (a denoiser that does not
    trace in front of a classifier that does) has its children folded one by one."""
    model = copy.deepcopy(model).eval()
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # tracing fails on data-dependent Python control flow
        if _fold_children(model):
            return model
        warnings.warn(f"batch norm not folded: the model could not be traced by torch.fx "
                      f"({type(error).__name__}: {error}); it runs unfolded", FoldingWarning, stacklevel=2)
        return model
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")

    def module_of(node: fx.Node) -> Optional[nn.Module]:
        return modules.get(node.target) if node.op == "call_module" else None

    for node in list(traced.graph.nodes):
        bn = module_of(node)
        if not (isinstance(bn, _BatchNorm) and bn.track_running_stats and node.args):
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        conv = module_of(source)
        if not isinstance(conv, _CONVOLUTIONS) or len(source.users) != 1 or calls[source.target] != 1:
            continue
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, folded_convolution(conv, bn))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()


def _fold_children(model: nn.Module) -> bool:
    """Fold each child of ``model`` (in place) that holds batch norms, separately; whether
    any batch norm was folded. Folding inside one child is exact whatever surrounds it."""
    before = count_batchnorm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldingWarning)
        for name, child in list(model.named_children()):
            if count_batchnorm(child):
                setattr(model, name, fold_batchnorm(child))
    return count_batchnorm(model) < before
