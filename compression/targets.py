"""Which linear layers of a transformer get compressed, and what each one is.

All architecture knowledge of the project lives in this module: which layers are blocks and
targets, their roles and input groups, and the two weight layouts (`nn.Linear` stores W [out, in],
transformers' `Conv1D` of GPT-2 stores it [in, out]); every other module reads and writes weights
through the helpers at the end (`dense_shape`, `dense_weight`, `set_dense_weight`, `dense_layer`,
`as_out_in`).

How layers are found (type and structure first, names only where nothing else can tell):

1. Blocks: the `nn.ModuleList` whose entries each hold at least two linear layers and which has the
   most parameters (`encoder.layer`, `transformer.h`, `model.layers`, `model.decoder.layers`, ...).
2. Targets: every `nn.Linear` and every transformers `Conv1D` (GPT-2; weight stored [in, out]) inside a
   block. Embeddings, `lm_head`, poolers and classifier heads live outside the blocks and are never
   targets.
3. Attention or MLP: a linear belongs to the attention part when one of its ancestors inside the block
   is a module whose class name contains "Attention" (BertAttention, GPT2Attention, LlamaAttention,
   DistilBertSelfAttention, MPNetAttention, OPTAttention, Gemma3Attention); all other linears of the
   block form the MLP.
4. Roles. Attention: q, k, v (or fused qkv) by layer name (`q_proj`, `query`, `q_lin`, `q`, `c_attn`,
   ...); the single remaining attention linear is the output projection "o" (`o_proj`, `out_proj`,
   `out_lin`, `o`, GPT-2 `attn.c_proj`, BERT `attention.output.dense`). MLP, by shapes: two linears
   with fc2.in == fc1.out and fc2.out == fc1.in are an ungated MLP, roles "fc1" / "fc2"; three linears
   where two read the hidden state and produce the intermediate width and the third maps it back are a
   gated MLP, roles "gate" / "up" / "down" (the gate is the one whose name contains "gate", else the
   first registered). A linear that fits none of these is an error naming it: a layout the rules do
   not know is refused, never guessed.

Role conventions per architecture:

    bert / MiniLM   attention.self.{query,key,value} q k v, attention.output.dense o,
                    intermediate.dense fc1, output.dense fc2
    distilbert      attention.{q_lin,k_lin,v_lin,out_lin} q k v o, ffn.lin1 fc1, ffn.lin2 fc2
    gpt2            attn.c_attn qkv (Conv1D), attn.c_proj o, mlp.c_fc fc1, mlp.c_proj fc2
    opt             self_attn.{q,k,v,out}_proj q k v o, fc1 fc1, fc2 fc2
    llama, gemma3   self_attn.{q,k,v,o}_proj q k v o, mlp.gate_proj gate, mlp.up_proj up,
                    mlp.down_proj down
    mpnet           attention.attn.{q,k,v,o} q k v o, intermediate.dense fc1, output.dense fc2

Input groups are derived from the roles, not from a forward pass: in every supported architecture
q, k and v read the same tensor, and so do gate and up. `collect_stats` checks this on the real data
flow (it fails loudly if members of a group see different inputs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UserInputError

LINEAR_TYPES = (nn.Linear, Conv1D)
LAYER_KINDS = ("linear", "conv1d")  # what `layer_kind` returns and `dense_layer` builds
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")
MLP_ROLE = "mlp"  # the role of a whole MLP (the unit of neuron pruning)

_ATTENTION_NAMES = {
    "q": {"q", "q_proj", "query", "q_lin", "wq", "query_proj"},
    "k": {"k", "k_proj", "key", "k_lin", "wk", "key_proj"},
    "v": {"v", "v_proj", "value", "v_lin", "wv", "value_proj"},
    "qkv": {"c_attn", "qkv", "qkv_proj", "query_key_value", "wqkv"},
}
_SHARED_INPUT = ({"q", "k", "v"}, {"gate", "up"})


@dataclass(frozen=True)
class Target:
    """One compressible linear layer. `in_features` / `out_features` are those of y = W x + b."""

    name: str
    role: str
    block: int
    in_features: int
    out_features: int
    transposed: bool
    input_group: str

    @property
    def params(self) -> int:
        """Weight parameters (bias excluded)."""
        return self.in_features * self.out_features


@dataclass(frozen=True)
class MlpGroup:
    """One MLP: neuron pruning removes rows of every `inputs` layer and columns of `down`.

    `neuron_cost`: parameters one intermediate neuron costs, a row (and its bias entry) of every
    input layer plus a column of the down weight (the down bias is kept and not counted)."""

    block: int
    name: str
    inputs: tuple[str, ...]
    down: str
    width: int
    activation_gated: bool
    neuron_cost: int

    @property
    def role(self) -> str:
        return MLP_ROLE


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path `name`; UserInputError when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise UserInputError(f"layer '{name}' does not exist in {type(model).__name__}") from e


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (which must exist) by `module`."""
    get_module(model, name)
    parent, _, leaf = name.rpartition(".")
    setattr(get_module(model, parent) if parent else model, leaf, module)


def _n_linears(module: nn.Module) -> int:
    return sum(isinstance(m, LINEAR_TYPES) for m in module.modules())


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the transformer blocks: see the module docstring."""
    candidates = [
        (sum(p.numel() for p in mod.parameters()), path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(_n_linears(b) >= 2 for b in mod)
    ]
    if not candidates:
        raise UserInputError(
            f"model {type(model).__name__} has no list of transformer blocks (an nn.ModuleList of "
            "layers holding Linear/Conv1D modules); supported: bert, distilbert, gpt2, opt, llama, gemma3, mpnet"
        )
    _, path, blocks = max(candidates, key=lambda c: c[0])
    return path, blocks


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order (index = `Target.block`)."""
    return list(_block_list(model)[1])


def _is_attention(block: nn.Module, rel: str) -> bool:
    """Whether the linear at path `rel` (relative to `block`) sits inside an attention module."""
    parts = rel.split(".")
    for i in range(1, len(parts)):
        if "attention" in type(block.get_submodule(".".join(parts[:i]))).__name__.lower():
            return True
    return False


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()


def _attention_roles(rels: list[str]) -> dict[str, str | None]:
    """q/k/v/qkv by name; the single linear left over is "o"; several left over have no role (None)."""
    roles: dict[str, str | None] = {}
    for rel in rels:
        roles[rel] = next((r for r, names in _ATTENTION_NAMES.items() if _leaf(rel) in names), None)
    rest = [rel for rel in rels if roles[rel] is None]
    if len(rest) == 1:
        roles[rest[0]] = "o"
    return roles


def _mlp_roles(rels: list[str], shapes: dict[str, tuple[int, int]]) -> dict[str, str | None]:
    """fc1/fc2 or gate/up/down by shape; None for linears that fit neither pattern."""
    roles: dict[str, str | None] = {rel: None for rel in rels}
    if len(rels) == 2:
        a, b = rels
        for first, second in ((a, b), (b, a)):
            (i1, o1), (i2, o2) = shapes[first], shapes[second]
            if o1 == i2 and i1 == o2:
                roles[first], roles[second] = "fc1", "fc2"
                break
    elif len(rels) == 3:
        for down in reversed(rels):
            x, y = [rel for rel in rels if rel != down]
            d_in, d_out = shapes[down]
            if shapes[x] == shapes[y] == (d_out, d_in):
                gate, up = (y, x) if "gate" in _leaf(y) and "gate" not in _leaf(x) else (x, y)
                roles[gate], roles[up], roles[down] = "gate", "up", "down"
                break
    return roles


def find_targets(model: nn.Module, roles: Iterable[str] | None = None) -> list[Target]:
    """Every Linear/Conv1D inside the transformer blocks (optionally only `roles`), in module order.

    `input_group` is the name of the first selected target of the same block whose role reads the
    same input (q/k/v; gate/up); every other target is its own group.
    """
    wanted = None if roles is None else list(roles)
    if wanted is not None:
        bad = [r for r in wanted if r not in ROLES]
        if bad or not wanted:
            raise UserInputError(f"roles {wanted}: unknown {bad or 'empty list'}; allowed: {', '.join(ROLES)}")
    path, blocks = _block_list(model)
    prefix = f"{path}." if path else ""
    found: list[tuple[str, str, int, tuple[int, int], bool]] = []
    for b, block in enumerate(blocks):
        linears = [(rel, m) for rel, m in block.named_modules() if isinstance(m, LINEAR_TYPES)]
        shapes = {rel: dense_shape(m)[:2] for rel, m in linears}
        attn = [rel for rel, _ in linears if _is_attention(block, rel)]
        mlp = [rel for rel, _ in linears if rel not in attn]
        block_roles = _attention_roles(attn) | _mlp_roles(mlp, shapes)
        unknown = [rel for rel, _ in linears if block_roles[rel] is None]
        if unknown:
            (n_in, n_out) = shapes[unknown[0]]
            part = "attention" if unknown[0] in attn else "MLP"
            raise UserInputError(
                f"model {type(model).__name__}: layer '{prefix}{b}.{unknown[0]}' ({part} part of block {b}, "
                f"[{n_out} x {n_in}]) has no role this project recognises"
                + (f" (nor {', '.join(repr(prefix + str(b) + '.' + r) for r in unknown[1:])})" if unknown[1:] else "")
                + "; attention roles come from layer names (q, k, v, qkv; the one left over is o), MLP roles "
                  "from shapes (fc1/fc2, or gate/up/down); supported: bert, distilbert, gpt2, opt, llama, gemma3, "
                  "mpnet. Teach compression/targets.py the new layout rather than guessing it")
        for rel, m in linears:
            found.append((f"{prefix}{b}.{rel}", block_roles[rel], b, shapes[rel], isinstance(m, Conv1D)))

    selected = [f for f in found if wanted is None or f[1] in wanted]
    if not selected:
        present = sorted({f[1] for f in found})
        raise UserInputError(
            f"roles {wanted}: model {type(model).__name__} has no such layers; its roles are {', '.join(present)}"
        )
    leaders: dict[tuple[int, int], str] = {}
    targets = []
    for name, role, b, (n_in, n_out), transposed in selected:
        share = next((i for i, roles_ in enumerate(_SHARED_INPUT) if role in roles_), None)
        group = name if share is None else leaders.setdefault((b, share), name)
        targets.append(Target(name, role, b, n_in, n_out, transposed, group))
    return targets


def weight_matrix(model: nn.Module, target: Target) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    return as_out_in(get_module(model, target.name).weight, target.transposed)


def find_mlps(model: nn.Module) -> list[MlpGroup]:
    """The MLP of every block that has one (fc1/fc2 or gate/up/down); UserInputError when there is none."""
    targets = find_targets(model)
    mlps = []
    for b in sorted({t.block for t in targets}):
        inputs = tuple(t.name for t in targets if t.block == b and t.role in ("gate", "up", "fc1"))
        downs = [t for t in targets if t.block == b and t.role in ("down", "fc2")]
        if not inputs or len(downs) != 1:
            continue
        down = downs[0]
        parts = [n.split(".") for n in (*inputs, down.name)]
        common = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        cost = down.out_features + sum(
            t.in_features + int(get_module(model, t.name).bias is not None) for t in targets if t.name in inputs)
        mlps.append(MlpGroup(b, ".".join(common), inputs, down.name, down.in_features, len(inputs) == 2, cost))
    if not mlps:
        raise UserInputError(
            f"model {type(model).__name__} has no MLP (fc1/fc2 or gate/up/down layers) in its blocks; "
            "method 'id' prunes MLP neurons and needs one"
        )
    return mlps


# -- the two weight layouts: nn.Linear (W [out, in]) and GPT-2's Conv1D (W [in, out]) --------------


def as_out_in(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight-shaped tensor (the weight, its gradient) as [out, in]: a view, transposed for Conv1D."""
    return tensor.t() if transposed else tensor


def dense_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an `nn.Linear` or `Conv1D`."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, layer.bias is not None
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf, layer.bias is not None
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def layer_kind(layer: nn.Module) -> str:
    """"linear" or "conv1d" (the kinds `dense_layer` builds)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, Conv1D):
        return "conv1d"
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def dense_layer(
    kind: str,
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """A freshly initialised `nn.Linear` (kind "linear") or `Conv1D` (kind "conv1d") of this shape."""
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    if kind == "conv1d":
        if not bias:
            raise ValueError("Conv1D layers always have a bias")
        return Conv1D(out_features, in_features).to(dtype=dtype, device=device)
    raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as [out, in] (a view)."""
    return as_out_in(layer.weight, layer_kind(layer) == "conv1d")


def set_dense_weight(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a weight given as [out, in] (and a bias) into an `nn.Linear` or `Conv1D` of that shape."""
    with torch.no_grad():
        as_out_in(layer.weight, layer_kind(layer) == "conv1d").copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
