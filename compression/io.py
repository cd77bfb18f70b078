"""Save and load compressed models as Hugging Face folders: safetensors and JSON only, no remote code.

A folder holds `config.json` (the unchanged config of the dense architecture),
`generation_config.json` (generative models), `model.safetensors`, the tokenizer files when a
tokenizer is given, and `lowrank.json`, which says how the compressed model differs from the one
the config builds::

    {
      "format": "lowrank-sweep", "version": 1,
      "architecture": "LlamaForCausalLM",          # class in `transformers`, also in config.architectures
      "dtype": "float32", "attn_implementation": "sdpa",
      "parameters": 1234567,                      # whole model, tied weights counted once
      "method": "whiten-fd", "plan": {...},       # RankPlan.to_dict(), or null
      "low_rank": {"model.layers.0.self_attn.q_proj":
                   {"in_features": 576, "out_features": 576, "rank": 96, "bias": false}},
      "resized": {"model.layers.0.mlp.up_proj":   # narrower dense layers (pruned MLPs)
                  {"kind": "linear", "in_features": 576, "out_features": 920, "bias": false}},
      "tied": {"lm_head.weight": "model.embed_tokens.weight"},   # saved once, retied on load
      "buffer_dtypes": {"model.rotary_emb.inv_freq": "bfloat16"},  # unsaved buffers cast after build
      "extra": {...}
    }

`load_compressed` builds the architecture from the config, swaps in empty `LowRankLinear` shells
and narrower layers as `lowrank.json` says, loads the weights strictly and reties tied weights:
the result gives identical logits.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from .errors import UserInputError
from .layers import LowRankLinear
from .targets import LAYER_KINDS, LINEAR_TYPES, dense_layer, dense_shape, layer_kind

FORMAT = "lowrank-sweep"
VERSION = 1
INFO_FILE = "lowrank.json"
WEIGHTS_FILE = "model.safetensors"
_REQUIRED = ("architecture", "dtype", "attn_implementation", "low_rank", "resized", "tied", "buffer_dtypes")
CODE_FILES = ("config.json", "tokenizer_config.json")  # where a folder could name code of its own (auto_map)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _structure(model: PreTrainedModel, reference: nn.Module) -> tuple[dict, dict]:
    """The low-rank layers of `model`, and its dense layers whose shape differs from `reference`."""
    low_rank, resized = {}, {}
    ref_modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            low_rank[name] = {"in_features": module.in_features, "out_features": module.out_features,
                              "rank": module.rank, "bias": module.has_bias}
        elif isinstance(module, LINEAR_TYPES) and name.rpartition(".")[0] not in low_rank:
            ref = ref_modules.get(name)
            if type(ref) is not type(module) or dense_shape(ref) != dense_shape(module):
                n_in, n_out, bias = dense_shape(module)
                resized[name] = {"kind": layer_kind(module), "in_features": n_in, "out_features": n_out,
                                 "bias": bias}
    return low_rank, resized


def _apply_structure(model: nn.Module, info: dict) -> None:
    """Swap in empty low-rank shells and narrower dense layers as `info` describes (in place)."""
    for name, spec in info["low_rank"].items():
        old = model.get_submodule(name)
        model.set_submodule(name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
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


def check_output_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path when `save_compressed` may write it: it does not exist, or it is an empty
    folder or one that function wrote (which it replaces)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / INFO_FILE).is_file())):
        what = "a file" if not out_dir.is_dir() else "a folder that is not a compressed model folder"
        raise UserInputError(f"output folder {out_dir} exists and is {what}; refusing to overwrite it "
                             f"(give a new folder, an empty one, or one written by save_compressed)")
    return out_dir


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
    out_dir = check_output_folder(out_dir)
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
    info["low_rank"], info["resized"] = _structure(model, reference)
    _apply_structure(reference, info)
    tied = _tied(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    ref_state = {k: v for k, v in reference.state_dict().items() if k not in tied}
    bad = sorted(k for k in state.keys() | ref_state.keys()
                 if k not in state or k not in ref_state or state[k].shape != ref_state[k].shape)
    if bad:
        raise UserInputError(f"the model differs from its config in ways {INFO_FILE} cannot describe "
                             f"(only LowRankLinear and resized Linear/Conv1D layers can): {', '.join(bad[:5])}")
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


def refuse_remote_code(folder: str | Path) -> None:
    """UserInputError when the model folder ships Python code of its own: an `auto_map` in its
    config.json or tokenizer_config.json. Nothing here runs code from a folder
    (`trust_remote_code=False` on every load), and transformers would otherwise ask on stdin."""
    folder = Path(folder)
    for name in CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"{path} cannot be read as JSON: {e}") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            raise UserInputError(
                f"model folder {folder} needs its own Python code ({name} has auto_map "
                f"{json.dumps(auto_map)}); code from a model folder is never run (trust_remote_code=False): "
                f"use a model whose architecture transformers implements")


def _read_info(path: Path) -> dict:
    """lowrank.json of `path`, its sections type-checked (no module is built from it yet)."""
    where = path / INFO_FILE
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserInputError(f"{where} is not a {FORMAT} version {VERSION} file")
    missing = [k for k in _REQUIRED if k not in info]
    dtypes = [info.get("dtype"), *(info.get("buffer_dtypes") or {}).values()] \
        if isinstance(info.get("buffer_dtypes", {}), dict) else [info.get("dtype"), None]
    if missing or not all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes):
        raise UserInputError(f"{where} is incomplete or damaged (missing {missing or 'nothing'}, dtypes {dtypes})")
    sections = {"low_rank": ("in_features", "out_features", "rank"), "resized": ("in_features", "out_features")}
    for section, sizes in sections.items():
        if not isinstance(info[section], dict):
            raise UserInputError(f"{where}: {section} must map layer names to their shapes")
        for name, spec in info[section].items():
            if not isinstance(spec, dict):
                raise UserInputError(f"{where}: {section}[{name!r}] must be an object, got {spec!r}")
            for key in sizes:
                value = spec.get(key)
                if not (isinstance(value, int) and not isinstance(value, bool)) or value < (0 if key == "rank" else 1):
                    allowed = "an integer >= 0" if key == "rank" else "a positive integer"
                    raise UserInputError(f"{where}: {section}[{name!r}].{key} is {value!r}; allowed: {allowed}")
            if not isinstance(spec.get("bias"), bool):
                raise UserInputError(f"{where}: {section}[{name!r}].bias is {spec.get('bias')!r}; allowed: true, false")
            if section == "resized" and spec.get("kind") not in LAYER_KINDS:
                raise UserInputError(f"{where}: resized[{name!r}].kind is {spec.get('kind')!r}; allowed: "
                                     f"{', '.join(LAYER_KINDS)}")
    for section in ("tied", "buffer_dtypes"):
        entries = info[section]
        if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in entries.items()):
            raise UserInputError(f"{where}: {section} must map names to names (strings)")
    return info


def _check_against_weights(shell: nn.Module, info: dict, path: Path) -> None:
    """Compare the model lowrank.json describes (built on the meta device: no memory) with the
    safetensors header of the weights file: the same tensor names, shapes and dtypes, and tied
    names that name parameters of equal shape. Nothing is allocated before this passes, so a
    damaged or hostile lowrank.json cannot make the loader allocate more than the file holds."""
    where = path / WEIGHTS_FILE
    try:
        with safe_open(str(where), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"{where} is not a readable safetensors file: {e}") from None
    params = dict(shell.named_parameters(remove_duplicate=False))
    for alias, source in info["tied"].items():
        if alias not in params or source not in params or params[alias].shape != params[source].shape:
            raise UserInputError(f"{path / INFO_FILE}: tied entry {alias!r} -> {source!r} does not name two "
                                 f"parameters of the same shape in the model")
    buffers = _non_persistent_buffers(shell)
    unknown = [name for name in info["buffer_dtypes"] if name not in buffers]
    if unknown:
        raise UserInputError(f"{path / INFO_FILE}: buffer_dtypes names {unknown[0]!r}, which is not an unsaved "
                             f"buffer of the model")
    expected = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype)) for k, v in shell.state_dict().items()
                if k not in info["tied"]}
    bad = sorted(k for k in expected.keys() | header.keys() if expected.get(k) != header.get(k))
    if bad:
        first = bad[0]
        raise UserInputError(
            f"weights in {where} do not match the model that config.json and {INFO_FILE} describe: "
            f"{len(bad)} tensor(s) differ, e.g. {first!r}: expected "
            f"{_shape_text(expected.get(first))}, the file holds {_shape_text(header.get(first))}")


def _shape_text(entry: tuple | None) -> str:
    return "nothing" if entry is None else f"{list(entry[0])} {entry[1]}"


def load_compressed(path: str | Path, device: torch.device | str = "cpu"):
    """Load a folder written by `save_compressed`: (model in eval mode, tokenizer or None, lowrank.json).

    Never runs code from the folder (safetensors and JSON only, `trust_remote_code=False`, a folder with an
    `auto_map` is refused). lowrank.json is checked against the weights file's header before any
    module is built, and the modules are built with empty (meta) parameters that the loaded
    weights replace: memory is bounded by the weights file."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"compressed model folder {path} does not exist or is not a folder")
    missing = [f for f in ("config.json", WEIGHTS_FILE, INFO_FILE) if not (path / f).is_file()]
    if missing:
        raise UserInputError(f"{path} is not a compressed model folder: missing {', '.join(missing)}")
    info = _read_info(path)
    refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {path / 'config.json'}: {e}") from None
    cls = _architecture(config)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers computed as usual
        try:
            model = _build(cls, config, info)
            _apply_structure(model, info)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserInputError(f"{path} does not match its {INFO_FILE}: {e}") from None
    _check_against_weights(model, info, path)
    try:
        state = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"{path / WEIGHTS_FILE} cannot be read: {e}") from None
    result = model.load_state_dict(state, strict=False, assign=True)
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
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) \
        if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, info
