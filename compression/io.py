"""Save and load compressed models as folders, safetensors and JSON only, running no code. Two layouts:

- **compact** (`save_compressed`): the factors, at the compressed size. Plain transformers cannot
  build this model (its layers are not the config's), so it must refuse the folder, never load it
  with random weights: `config.json` is the dense config with `model_type` and `architectures`
  replaced by markers (`AutoModel*.from_pretrained` and `AutoConfig` raise, naming
  `compression.load_compressed` in the message), and the weights are `lowrank.safetensors`
  (a concrete class's `from_pretrained` finds no `model.safetensors` and raises).
- **dense** (`save_dense`): `compression.densify` of the model (factors multiplied back, pruned MLPs
  zero-padded to full width), saved by `save_pretrained`: a standard folder that plain
  transformers, evaluation harnesses and serving stacks load, at the dense model's size.

Both hold the tokenizer files when a tokenizer is given, an optional model card (`README.md`),
weights in safetensors, sharded above `max_shard_size` with an index file (the transformers
convention: `model-00001-of-00002.safetensors` + `model.safetensors.index.json`; compact:
`lowrank-...`), and `lowrank.json`, which says what the folder holds::

    {
      "format": "lowrank-sweep", "version": 2, "layout": "compact",    # or "dense"
      "architecture": "LlamaForCausalLM", "model_type": "llama",     # the class in `transformers`
      "dtype": "float32", "attn_implementation": "sdpa",
      "parameters": 1234567,                      # of the saved model, tied weights counted once
      "compressed_parameters": 1234567,           # of the compressed model (dense layout: smaller)
      "method": "whiten-fd", "plan": {...},       # RankPlan.to_dict(), or null
      "low_rank": {"model.layers.0.self_attn.q_proj":          # compact only
                   {"in_features": 576, "out_features": 576, "rank": 96, "bias": false}},
      "resized": {"model.layers.0.mlp.up_proj":   # narrower dense layers (pruned MLPs); compact only
                   {"kind": "linear", "in_features": 576, "out_features": 920, "bias": false}},
      "identity_block": {"model.layers.0.self_attn.o_proj":    # IdentityBlockLinear layers; compact only
                   {"in_features": 576, "out_features": 576, "rank": 318, "bias": false}},
                  {"kind": "linear", "in_features": 576, "out_features": 920, "bias": false}},
      "tied": {"lm_head.weight": "model.embed_tokens.weight"},   # saved once, retied on load
      "buffer_dtypes": {"model.rotary_emb.inv_freq": "bfloat16"},  # unsaved buffers cast after build
      "extra": {...}
    }

`load_compressed` reads both layouts and the version 1 compact folders (dense `config.json`,
`model.safetensors`): for a compact folder it builds the architecture from the config, swaps in
empty `LowRankLinear` and `IdentityBlockLinear` shells and narrower layers as `lowrank.json` says,
loads the weights (and the identity blocks' index buffers) strictly and reties tied weights
(identical logits); a dense folder goes through `from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from .densify import densify
from .errors import UserInputError
from .folder_checks import check_against_weights, check_sections, non_persistent_buffers, refuse_remote_code
from .layers import IdentityBlockLinear, LowRankLinear
from .targets import LINEAR_TYPES, dense_layer, dense_shape, layer_kind

FORMAT = "lowrank-sweep"
VERSION = 2
LAYOUTS = ("compact", "dense")
DTYPES = ("float32", "bfloat16", "float16")
INFO_FILE = "lowrank.json"
CARD_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"                 # dense layout, and compact version 1
COMPACT_PATTERN = "lowrank{suffix}.safetensors"   # compact version 2: a name transformers never loads
COMPACT_WEIGHTS = COMPACT_PATTERN.format(suffix="")  # unsharded
COMPACT_INDEX = "lowrank.safetensors.index.json"
DEFAULT_SHARD_SIZE = "50GB"                        # transformers' default
# What `AutoConfig` / `AutoModel*.from_pretrained` print about a compact folder (they quote it).
COMPACT_MODEL_TYPE = ("lowrank-sweep-compact: a compressed model whose layers transformers alone cannot build; "
                      "load it with compression.load_compressed, or export it with `lrsweep export --format dense` "
                      "for plain transformers")
COMPACT_ARCHITECTURE = "LowRankSweepCompactModel"
_REQUIRED = {"compact": ("architecture", "dtype", "attn_implementation", "low_rank", "resized", "tied",
                         "buffer_dtypes"),
             "dense": ("architecture", "dtype", "attn_implementation")}
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


def _buffer_dtypes(model: nn.Module, reference: nn.Module) -> dict[str, str]:
    """dtypes of the buffers that are not saved (e.g. rotary frequencies) where they differ from a
    freshly built model, as after `model.to(torch.bfloat16)`."""
    ref = non_persistent_buffers(reference)
    return {name: str(buf.dtype).removeprefix("torch.") for name, buf in non_persistent_buffers(model).items()
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


def _architecture(name) -> type[PreTrainedModel]:
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UserInputError(f"architecture {name!r} is not a model class of transformers")
    return cls


def _build(cls: type[PreTrainedModel], config, info: dict) -> PreTrainedModel:
    # `_from_config` is what the Auto classes' `from_config` calls for a known class.
    return cls._from_config(copy.deepcopy(config), dtype=getattr(torch, info["dtype"]),
                            attn_implementation=info["attn_implementation"])


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the arguments both layouts take -------------------------------------------------------------


def check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a `DTYPES` name (or dtype); None keeps the model's own."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UserInputError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_shard_size(size: int | str | None) -> int | str:
    """`max_shard_size` as transformers takes it: bytes (int) or a size such as "2GB" or "500MB"."""
    if size is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str) and re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*[KMGT]B\s*", size, re.IGNORECASE) \
            and float(size.strip()[:-2]) > 0:
        return size.strip()
    raise UserInputError(f"max shard size {size!r} is not a size; give bytes (an integer) or a number with a "
                         f"unit KB, MB, GB or TB, e.g. 2GB or 500MB")


def _cast(model: PreTrainedModel, dtype: torch.dtype | None, copied: bool) -> PreTrainedModel:
    """`model` in `dtype` (a copy unless `copied` says it is one already; the caller's model is never cast)."""
    if dtype is None or dtype == model.dtype:
        return model
    return (model if copied else copy.deepcopy(model)).to(dtype)


def check_output_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path when `save_compressed` / `save_dense` may write it: it does not exist, or
    it is an empty folder or one this module wrote (which it replaces)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / INFO_FILE).is_file())):
        what = "a file" if not out_dir.is_dir() else "a folder that is not a compressed model folder"
        raise UserInputError(f"output folder {out_dir} exists and is {what}; refusing to overwrite it "
                             f"(give a new folder, an empty one, or one written by save_compressed)")
    return out_dir


def _write_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` on a temporary folder next to `out_dir`, then rename it to `out_dir`
    (replacing a previous export), so `out_dir` never holds half a model. The folder gets the
    usual permissions (those of `mkdir`), not the 0700 of a temporary folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
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


def _save_common(folder: Path, info: dict, tokenizer, card: str | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / CARD_FILE).write_text(card)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _header(model: PreTrainedModel, layout: str, plan, extra: dict | None, compressed_parameters: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "layout": layout, "architecture": type(model).__name__,
            "model_type": model.config.model_type, "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": model.config._attn_implementation, "parameters": _parameters(model),
            "compressed_parameters": compressed_parameters, "method": getattr(plan, "method", None),
            "plan": plan.to_dict() if plan is not None else None, "extra": extra or {}}


def _check_model(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise UserInputError(f"saving needs a Hugging Face PreTrainedModel, got {type(model).__name__}")


# -- compact --------------------------------------------------------------------------------------


def save_compressed(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer=None,
    plan=None,
    extra: dict | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    card: str | None = None,
) -> Path:
    """Write `model` (compressed or not) as a compact folder (see the module docstring); return the path.

    Written to a temporary folder next to `out_dir`, then renamed, so `out_dir` never holds half a
    model. An existing `out_dir` is replaced only if it is empty or a folder this module wrote.
    `plan` is a `RankPlan` (its method is recorded); `extra` any JSON-able dict; `dtype` one of
    `DTYPES` (default: the model's); `card` the text of README.md.
    """
    _check_model(model)
    out_dir = check_output_folder(out_dir)
    dtype, max_shard_size = check_dtype(dtype), check_shard_size(max_shard_size)
    compressed = _parameters(model)
    model = _cast(model, dtype, copied=False)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    info = _header(model, "compact", plan, extra, compressed)
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
    info.update(buffer_dtypes=_buffer_dtypes(model, reference), tied=tied)
    json.dumps(info)  # fail before writing anything if `extra` is not JSON-able

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        marked = json.loads((folder / "config.json").read_text())
        marked.update(model_type=COMPACT_MODEL_TYPE, architectures=[COMPACT_ARCHITECTURE])
        (folder / "config.json").write_text(json.dumps(marked, indent=2, sort_keys=True) + "\n")
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
        _save_shards(_contiguous(state), folder, max_shard_size)
        _save_common(folder, info, tokenizer, card)

    return _write_folder(out_dir, write)


def _save_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    """safetensors files of at most `max_shard_size` each (huggingface_hub's split), with an index
    file when there are several."""
    split = split_torch_state_dict_into_shards(state, filename_pattern=COMPACT_PATTERN, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, folder / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / COMPACT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


# -- dense ----------------------------------------------------------------------------------------


def save_dense(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer=None,
    plan=None,
    extra: dict | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    card: str | None = None,
) -> Path:
    """Write `densify(model)` with `save_pretrained` (a standard folder, see the module docstring),
    plus `lowrank.json` (layout "dense") and the card; the same arguments as `save_compressed`.
    The caller's model is not changed."""
    _check_model(model)
    out_dir = check_output_folder(out_dir)
    dtype, max_shard_size = check_dtype(dtype), check_shard_size(max_shard_size)
    compressed = _parameters(model)
    dense = _cast(densify(model), dtype, copied=True)
    dense.config.architectures = [type(dense).__name__]
    info = _header(dense, "dense", plan, extra, compressed)
    json.dumps(info)

    def write(folder: Path) -> None:
        dense.save_pretrained(folder, max_shard_size=max_shard_size)
        _save_common(folder, info, tokenizer, card)

    return _write_folder(out_dir, write)


# -- loading --------------------------------------------------------------------------------------


def _read_info(path: Path) -> dict:
    if not (path / INFO_FILE).is_file():
        raise UserInputError(f"{path} is not a compressed model folder: missing {INFO_FILE}")
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path / INFO_FILE} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") not in (1, VERSION):
        raise UserInputError(f"{path / INFO_FILE} is not a {FORMAT} file of version 1 or {VERSION}")
    info.setdefault("layout", "compact")  # version 1 wrote compact folders only
    if info["layout"] not in LAYOUTS:
        raise UserInputError(f"{path / INFO_FILE}: layout {info['layout']!r}; allowed: {', '.join(LAYOUTS)}")
    missing = [k for k in _REQUIRED[info["layout"]] if k not in info]
    dtypes = [info.get("dtype"), *(info.get("buffer_dtypes") or {}).values()] \
        if isinstance(info.get("buffer_dtypes", {}), dict) else [info.get("dtype"), None]
    if missing or not all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes):
        raise UserInputError(f"{path / INFO_FILE} is incomplete or damaged (missing {missing or 'nothing'}, "
                             f"dtypes {dtypes})")
    if info["layout"] == "compact":
        check_sections(info, path / INFO_FILE)
    return info


def _weight_files(path: Path, info: dict) -> list[Path]:
    """The compact folder's safetensors files (one, or the shards its index names)."""
    if info["version"] == 1:
        files = [path / WEIGHTS_FILE]
    elif (path / COMPACT_INDEX).is_file():
        try:
            weight_map = json.loads((path / COMPACT_INDEX).read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values())) if "/" not in f and f.endswith(".safetensors")]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserInputError(f"{path / COMPACT_INDEX} is not a safetensors index: {e!r}") from None
    else:
        files = [path / COMPACT_WEIGHTS]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise UserInputError(f"{path} is not a compressed model folder: missing {', '.join(missing) or 'weights'}")
    return files


def _config(path: Path, info: dict):
    """The dense config: config.json as it is (version 1), or with its markers undone."""
    try:
        if info["version"] == 1:
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
        data = json.loads((path / "config.json").read_text())
        data.update(model_type=info.get("model_type"), architectures=[info["architecture"]])
        config_class = transformers.CONFIG_MAPPING[data["model_type"]]
        return config_class.from_dict(data)
    except KeyError:
        raise UserInputError(f"{path / INFO_FILE}: model type {info.get('model_type')!r} is not one of "
                             f"transformers") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserInputError(f"cannot read {path / 'config.json'}: {e}") from None


def load_compressed(path: str | Path, device: torch.device | str = "cpu"):
    """Load a folder written by `save_compressed` or `save_dense`: (model in eval mode, tokenizer or
    None, lowrank.json as a dict)."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"compressed model folder {path} does not exist or is not a folder")
    missing = [f for f in ("config.json", INFO_FILE) if not (path / f).is_file()]
    if missing:
        raise UserInputError(f"{path} is not a compressed model folder: missing {', '.join(missing)}")
    info = _read_info(path)
    refuse_remote_code(path)
    cls = _architecture(info["architecture"])
    model = _load_dense(path, cls, info) if info["layout"] == "dense" else _load_compact(path, cls, info)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) \
        if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, info


def _load_dense(path: Path, cls: type[PreTrainedModel], info: dict) -> PreTrainedModel:
    try:
        return cls.from_pretrained(path, dtype=getattr(torch, info["dtype"]), trust_remote_code=False,
                                   attn_implementation=info["attn_implementation"])
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise UserInputError(f"cannot load the dense model in {path}: {e}") from None


def _load_compact(path: Path, cls: type[PreTrainedModel], info: dict) -> PreTrainedModel:
    """lowrank.json is checked against the weights files' headers before any module is built, and
    the modules are built with empty (meta) parameters that the loaded weights replace: memory is
    bounded by the weights files."""
    files = _weight_files(path, info)
    config = _config(path, info)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers computed as usual
        try:
            model = _build(cls, config, info)
            _apply_structure(model, info)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserInputError(f"{path} does not match its {INFO_FILE}: {e}") from None
    check_against_weights(model, info, path / INFO_FILE, files)
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise UserInputError(f"{file} cannot be read: {e}") from None
    result = model.load_state_dict(state, strict=False, assign=True)
    bad = sorted(set(result.missing_keys) - set(info["tied"])) + sorted(result.unexpected_keys)
    if bad:
        raise UserInputError(f"weights in {path} do not match the model: {', '.join(bad[:5])}")
    _retie(model, info["tied"])
    buffers = non_persistent_buffers(model)
    for name, dtype in info["buffer_dtypes"].items():
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(attr, buffers[name].to(getattr(torch, dtype)),
                                                         persistent=False)
    return model
