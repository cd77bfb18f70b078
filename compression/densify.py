"""Dense copies of compressed models: the same function in the shapes of the model's own config.

`densify` undoes the layout of compression, not its effect:

- every `LowRankLinear` (y = A (B x) + b) and `IdentityBlockLinear` becomes a dense layer of the
  kind the architecture uses (`nn.Linear`, or GPT-2's `Conv1D`) holding W = A B (multiplied in
  float64) and the bias;
- every MLP narrowed by neuron pruning (`id`: k of its n neurons kept) gets its full width back:
  the kept neurons first, then n - k neurons with zero rows (and zero bias entries) in the input
  layers (up/gate/fc1) and zero columns in the down layer (down/fc2). A zero column of the down
  weight drops whatever the activation makes of the neuron, so the output is unchanged.

The result is a model that `PreTrainedModel.from_pretrained` rebuilds from the unchanged config:
the standard folder any harness or server loads, at the dense model's size (no saving left).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import UserInputError
from .layers import IdentityBlockLinear, LowRankLinear
from .targets import LINEAR_TYPES, dense_layer, dense_shape, dense_weight, find_mlps, layer_kind, set_module


def reference_model(model: PreTrainedModel) -> PreTrainedModel:
    """The model its config builds, on the meta device (shapes and layer kinds only, no memory)."""
    with torch.device("meta"):
        return type(model)._from_config(copy.deepcopy(model.config))


def densify(model: PreTrainedModel, inplace: bool = False) -> PreTrainedModel:
    """`model` with every compressed layer dense again at the config's shapes (see the module
    docstring); a deep copy unless `inplace`. UserInputError when a layer differs from the config
    in a way compression does not produce."""
    if not isinstance(model, PreTrainedModel):
        raise UserInputError(f"densify needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    reference = reference_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    ref_modules = dict(reference.named_modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, (LowRankLinear, IdentityBlockLinear)):
            set_module(model, name, _multiplied(module, _reference_layer(ref_modules, name)))
    if _differing(model, ref_modules):  # narrowed MLPs (find_mlps refuses a model without MLPs)
        for mlp in find_mlps(reference):
            _widen(model, mlp)
    for name in _differing(model, ref_modules):
        layer, ref = model.get_submodule(name), ref_modules[name]
        raise UserInputError(f"layer {name!r} is a {type(layer).__name__} {_shape(layer)} where the config builds "
                             f"a {type(ref).__name__} {_shape(ref)}; only low-rank layers and narrowed MLPs can be "
                             f"made dense")
    return model


def _shape(layer: nn.Module) -> str:
    if not isinstance(layer, LINEAR_TYPES):
        return ""
    n_in, n_out, _ = dense_shape(layer)
    return f"[{n_out} x {n_in}]"


def _differing(model: nn.Module, ref_modules: dict[str, nn.Module]) -> list[str]:
    """Names of the config's Linear/Conv1D layers that `model` holds in another type or shape."""
    out = []
    for name, ref in ref_modules.items():
        if isinstance(ref, LINEAR_TYPES):
            layer = model.get_submodule(name)
            if type(layer) is not type(ref) or dense_shape(layer) != dense_shape(ref):
                out.append(name)
    return out


def _reference_layer(ref_modules: dict[str, nn.Module], name: str) -> nn.Module:
    ref = ref_modules.get(name)
    if not isinstance(ref, LINEAR_TYPES):
        raise UserInputError(f"low-rank layer {name!r} replaces no Linear/Conv1D layer of the config's model")
    return ref


def _multiplied(layer: LowRankLinear | IdentityBlockLinear, ref: nn.Module) -> nn.Module:
    """The dense layer of `ref`'s kind computing what `layer` computes."""
    weight = next(layer.parameters())
    dense = dense_layer(layer_kind(ref), layer.in_features, layer.out_features, layer.has_bias,
                        dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        dense_weight(dense).copy_(copy.deepcopy(layer).double().product())
        if layer.has_bias:
            dense.bias.copy_(layer.bias_vector())
    return dense.train(layer.training).requires_grad_(weight.requires_grad)


def _widen(model: nn.Module, mlp) -> None:
    """Zero-pad the MLP `mlp` (of the reference model) to its full width, in place."""
    down = model.get_submodule(mlp.down)
    kept = dense_shape(down)[0]
    if kept == mlp.width:
        return
    if kept > mlp.width:
        raise UserInputError(f"MLP {mlp.name!r} has {kept} neurons, more than the config's {mlp.width}")
    for name in (*mlp.inputs, mlp.down):
        old = model.get_submodule(name)
        n_in, n_out, bias = dense_shape(old)
        is_down = name == mlp.down
        new = dense_layer(layer_kind(old), mlp.width if is_down else n_in, n_out if is_down else mlp.width, bias,
                          dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            weight = dense_weight(new)
            weight.zero_()
            if is_down:
                weight[:, :kept].copy_(dense_weight(old))
            else:
                weight[:kept].copy_(dense_weight(old))
            if bias:
                new.bias.zero_()
                (new.bias if is_down else new.bias[:kept]).copy_(old.bias)
        set_module(model, name, new.train(old.training).requires_grad_(old.weight.requires_grad))
