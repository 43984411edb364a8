"""BatchNorm folding and structure reading on torch modules, shared by the torch-side quantizers.

``cle`` and ``bias-correction`` both act on the folded weights the target will
deploy, so both fold every BatchNorm that directly follows a conv/linear into
it first (``W ← W·γ/σ``, ``b ← (b − μ)·γ/σ + β``; the BN becomes
``nn.Identity``).  The structure is read with ``torch.fx`` (the model itself is
edited in place).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ExportError

#: layers whose weights the torch-side quantizers rescale or correct
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx`` trace used only to read the model's structure (the model itself is edited in place)."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise ExportError(f"could not trace {type(model).__name__} with torch.fx to read its layer structure: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
                          "Move data-dependent control flow out of forward") from exc


def fold_batch_norms(model: nn.Module) -> list[str]:
    """Fold each BatchNorm that directly follows a conv/linear into it, in place; return the folded BN names.

    The BN is replaced by ``nn.Identity`` and the layer gains a bias if it had
    none.  Uses the running statistics (inference semantics)."""
    gm = trace(model)
    calls = module_calls(gm)
    folded = []
    for node in gm.graph.nodes:
        bn = module_of(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        prev = node.args[0] if node.args else None
        layer = module_of(gm, prev) if isinstance(prev, torch.fx.Node) else None
        if not isinstance(layer, WEIGHTED) or len(prev.users) != 1 or calls[prev.target] != 1 \
                or calls[node.target] != 1 or layer.weight.shape[0] != bn.num_features:
            continue
        _fold(layer, bn)
        set_module(model, node.target, nn.Identity())
        folded.append(node.target)
    return folded


def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        inv = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            inv = inv * bn.weight.double()
        mean = bn.running_mean.double()
        shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        w = layer.weight
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        w.copy_((w.double() * inv.reshape((-1,) + (1,) * (w.ndim - 1))).float())
        new_bias = ((bias - mean) * inv + shift).float()
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)


def module_of(gm: torch.fx.GraphModule, node) -> nn.Module | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def module_calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How often each module is called: a reused layer cannot be rescaled for one use alone."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
