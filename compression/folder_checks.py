"""What a model folder says, checked before anything is built from it: that it ships no code of its
own (an `auto_map`), that lowrank.json's sections have the types and ranges they must, and that the
weights files' headers hold exactly the tensors the described model has. A damaged or hostile
folder is refused with a message naming the file and the entry; nothing is allocated first."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import UserInputError
from .targets import LAYER_KINDS

CODE_FILES = ("config.json", "tokenizer_config.json")  # where a folder could name code of its own (auto_map)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    saved = model.state_dict().keys()
    return {name: buf for name, buf in model.named_buffers() if name not in saved}


def check_sections(info: dict, where: Path) -> None:
    """The compact layout's sections type-checked (no module is built from them yet)."""
    info.setdefault("identity_block", {})  # version 1 had no identity blocks
    sections = {"low_rank": ("in_features", "out_features", "rank"), "identity_block": ("in_features", "out_features", "rank"),
                "resized": ("in_features", "out_features")}
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


def check_against_weights(shell: nn.Module, info: dict, where: Path, files: list[Path]) -> None:
    """Compare the model lowrank.json describes (built on the meta device: no memory) with the
    safetensors headers of the weights files: the same tensor names, shapes and dtypes, and tied
    names that name parameters of equal shape. Nothing is allocated before this passes, so a
    damaged or hostile lowrank.json cannot make the loader allocate more than the files hold."""
    header = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                header.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise UserInputError(f"{file} is not a readable safetensors file: {e}") from None
    params = dict(shell.named_parameters(remove_duplicate=False))
    for alias, source in info["tied"].items():
        if alias not in params or source not in params or params[alias].shape != params[source].shape:
            raise UserInputError(f"{where}: tied entry {alias!r} -> {source!r} does not name two "
                                 f"parameters of the same shape in the model")
    buffers = non_persistent_buffers(shell)
    unknown = [name for name in info["buffer_dtypes"] if name not in buffers]
    if unknown:
        raise UserInputError(f"{where}: buffer_dtypes names {unknown[0]!r}, which is not an unsaved "
                             f"buffer of the model")
    expected = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype)) for k, v in shell.state_dict().items()
                if k not in info["tied"]}
    bad = sorted(k for k in expected.keys() | header.keys() if expected.get(k) != header.get(k))
    if bad:
        first = bad[0]
        raise UserInputError(
            f"weights in {where.parent} do not match the model that config.json and {where.name} describe: "
            f"{len(bad)} tensor(s) differ, e.g. {first!r}: expected "
            f"{_shape_text(expected.get(first))}, the file holds {_shape_text(header.get(first))}")


def _shape_text(entry: tuple | None) -> str:
    return "nothing" if entry is None else f"{list(entry[0])} {entry[1]}"
