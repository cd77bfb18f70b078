"""Save and load compressed models as Hugging Face folders, with no pickle and no remote code.

A folder holds `config.json` (the unchanged config of the dense architecture),
`generation_config.json` (generative models), `model.safetensors`, the tokenizer files when a
tokenizer is given, and `lowrank.json`, which says how the compressed model differs from the one
the config builds::

    {
      "format": "lowrank-sweep", "version": 2,
      "architecture": "LlamaForCausalLM",          # class in `transformers`, also in config.architectures
      "dtype": "float32", "attn_implementation": "sdpa",
      "parameters": 1234567,                      # whole model, tied weights counted once
      "method": "whiten-fd", "plan": {...},       # RankPlan.to_dict(), or null
      "low_rank": {"model.layers.0.self_attn.q_proj":
                   {"in_features": 576, "out_features": 576, "rank": 96, "bias": false}},
      "identity_block": {"model.layers.0.self_attn.o_proj":    # IdentityBlockLinear layers
                   {"in_features": 576, "out_features": 576, "rank": 318, "bias": false}},
      "resized": {"model.layers.0.mlp.up_proj":   # narrower dense layers (pruned MLPs)
                  {"kind": "linear", "in_features": 576, "out_features": 920, "bias": false}},
      "tied": {"lm_head.weight": "model.embed_tokens.weight"},   # saved once, retied on load
      "buffer_dtypes": {"model.rotary_emb.inv_freq": "bfloat16"},  # unsaved buffers cast after build
      "extra": {...}
    }

`load_compressed` builds the architecture from the config, swaps in empty `LowRankLinear` and
`IdentityBlockLinear` shells and narrower layers as `lowrank.json` says, loads the weights (and the
identity blocks' index buffers) strictly and reties tied weights: the result gives identical
logits. Version 1 files (before identity blocks) are read as well.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from .errors import UserInputError
from .layers import IdentityBlockLinear, LowRankLinear
from .targets import LINEAR_TYPES, dense_layer, dense_shape, layer_kind

FORMAT = "lowrank-sweep"
VERSION = 2
READABLE_VERSIONS = (1, 2)
INFO_FILE = "lowrank.json"
WEIGHTS_FILE = "model.safetensors"
_REQUIRED = ("architecture", "dtype", "attn_implementation", "low_rank", "resized", "tied", "buffer_dtypes")


_FACTORED = {"low_rank": LowRankLinear, "identity_block": IdentityBlockLinear}  # lowrank.json key -> layer


def _structure(model: PreTrainedModel, reference: nn.Module) -> tuple[dict, dict, dict]:
    """The low-rank and identity-block layers of `model`, and its dense layers whose shape differs
    from `reference`."""
    factored: dict[str, dict] = {key: {} for key in _FACTORED}
    resized = {}
    ref_modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        key = next((k for k, cls in _FACTORED.items() if isinstance(module, cls)), None)
        if key is not None:
            factored[key][name] = {"in_features": module.in_features, "out_features": module.out_features,
                                   "rank": module.rank, "bias": module.has_bias}
        elif isinstance(module, LINEAR_TYPES) and not any(name.rpartition(".")[0] in f for f in factored.values()):
            ref = ref_modules.get(name)
            if type(ref) is not type(module) or dense_shape(ref) != dense_shape(module):
                n_in, n_out, bias = dense_shape(module)
                resized[name] = {"kind": layer_kind(module), "in_features": n_in, "out_features": n_out,
                                 "bias": bias}
    return factored["low_rank"], factored["identity_block"], resized


def _apply_structure(model: nn.Module, info: dict) -> None:
    """Swap in empty low-rank shells and narrower dense layers as `info` describes (in place)."""
    for key, cls in _FACTORED.items():
        for name, spec in info.get(key, {}).items():
            old = model.get_submodule(name)
            model.set_submodule(name, cls(spec["in_features"], spec["out_features"], spec["rank"],
                                          bias=spec["bias"], dtype=_dtype_of(old, model),
                                          device=_device_of(old, model)), strict=True)
    for name, spec in info["resized"].items():
        old = model.get_submodule(name)
        model.set_submodule(name, dense_layer(spec["kind"], spec["in_features"], spec["out_features"],
                                              spec["bias"], dtype=_dtype_of(old, model),
                                              device=_device_of(old, model)), strict=True)


def _dtype_of(module: nn.Module, model: nn.Module) -> torch.dtype:
    return next(module.parameters(), next(model.parameters())).dtype


def _device_of(module: nn.Module, model: nn.Module) -> torch.device:
    return next(module.parameters(), next(model.parameters())).device


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    saved = model.state_dict().keys()
    return {name: buf for name, buf in model.named_buffers() if name not in saved}


def _buffer_dtypes(model: nn.Module, reference: nn.Module) -> dict[str, str]:
    """dtypes of the buffers that are not saved (e.g. rotary frequencies) where they differ from a
    freshly built model, as after `model.to(torch.bfloat16)`."""
    ref = _non_persistent_buffers(reference)
    return {name: str(buf.dtype).removeprefix("torch.") for name, buf in _non_persistent_buffers(model).items()
            if name in ref and buf.dtype != ref[name].dtype}


def _tied(model: nn.Module) -> dict[str, str]:
    """alias -> source for parameters shared by several modules (source: first name met)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    for alias, source in tied.items():
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))


def _architecture(config) -> type[PreTrainedModel]:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UserInputError(f"config.architectures {names} does not name a model class of transformers")
    return cls


def _build(cls: type[PreTrainedModel], config, info: dict) -> PreTrainedModel:
    # `_from_config` is what the Auto classes' `from_config` calls for a known class.
    return cls._from_config(copy.deepcopy(config), dtype=getattr(torch, info["dtype"]),
                            attn_implementation=info["attn_implementation"])


def save_compressed(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer=None,
    plan=None,
    extra: dict | None = None,
) -> Path:
    """Write `model` (compressed or not) as a Hugging Face folder plus `lowrank.json`; return the path.

    Written to a temporary folder next to `out_dir`, then renamed, so `out_dir` never holds half a
    model. An existing `out_dir` is replaced only if it is empty or a folder this function wrote.
    `plan` is a `RankPlan` (its method is recorded); `extra` any JSON-able dict.
    """
    if not isinstance(model, PreTrainedModel):
        raise UserInputError(f"save_compressed needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / INFO_FILE).is_file())):
        raise UserInputError(f"output folder {out_dir} exists and is not a compressed model folder; "
                             f"refusing to overwrite it")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    info = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
    }
    with torch.device("meta"):
        reference = _build(type(model), config, info)
    info["low_rank"], info["identity_block"], info["resized"] = _structure(model, reference)
    _apply_structure(reference, info)
    tied = _tied(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    ref_state = {k: v for k, v in reference.state_dict().items() if k not in tied}
    bad = sorted(k for k in state.keys() | ref_state.keys()
                 if k not in state or k not in ref_state or state[k].shape != ref_state[k].shape)
    if bad:
        raise UserInputError(f"the model differs from its config in ways {INFO_FILE} cannot describe "
                             f"(only LowRankLinear, IdentityBlockLinear and resized Linear/Conv1D layers can): "
                                 f"{', '.join(bad[:5])}")
    info["buffer_dtypes"] = _buffer_dtypes(model, reference)
    info.update(tied=tied, parameters=sum(p.numel() for p in model.parameters()),
                method=getattr(plan, "method", None), plan=plan.to_dict() if plan is not None else None,
                extra=extra or {})
    json.dumps(info)  # fail before writing anything if `extra` is not JSON-able

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(_contiguous(state), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "x")
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_compressed(path: str | Path, device: torch.device | str = "cpu"):
    """Load a folder written by `save_compressed`: (model in eval mode, tokenizer or None, lowrank.json)."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"compressed model folder {path} does not exist or is not a folder")
    missing = [f for f in ("config.json", WEIGHTS_FILE, INFO_FILE) if not (path / f).is_file()]
    if missing:
        raise UserInputError(f"{path} is not a compressed model folder: missing {', '.join(missing)}")
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path / INFO_FILE} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") not in READABLE_VERSIONS:
        raise UserInputError(f"{path / INFO_FILE} is not a {FORMAT} file of version "
                             f"{' or '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in _REQUIRED if k not in info]
    dtypes = [info.get("dtype"), *info.get("buffer_dtypes", {}).values()]
    if missing or not all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes):
        raise UserInputError(f"{path / INFO_FILE} is incomplete or damaged (missing {missing or 'nothing'}, "
                             f"dtypes {dtypes})")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {path / 'config.json'}: {e}") from None
    model = _build(_architecture(config), config, info)
    try:
        _apply_structure(model, info)
        state = load_file(path / WEIGHTS_FILE)
    except (AttributeError, KeyError, TypeError, SafetensorError, OSError) as e:
        raise UserInputError(f"{path} does not match its {INFO_FILE}: {e}") from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise UserInputError(f"weights in {path / WEIGHTS_FILE} do not match the model: {e}") from None
    bad = sorted(set(result.missing_keys) - set(info["tied"])) + sorted(result.unexpected_keys)
    if bad:
        raise UserInputError(f"weights in {path / WEIGHTS_FILE} do not match the model: {', '.join(bad[:5])}")
    _retie(model, info["tied"])
    buffers = _non_persistent_buffers(model)
    for name, dtype in info["buffer_dtypes"].items():
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(attr, buffers[name].to(getattr(torch, dtype)),
                                                         persistent=False)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, info
