"""One string names a model or a data source.

    packaged:<name>                 models and corpora carried by pip packages (see `describe_sources()`)
    hf:<id>[:<config>][:<split>]    a Hugging Face hub model or `datasets` dataset (needs the network or its cache)
    path:<dir or file>              a local model folder (or .gguf file), or a .txt/.csv/.tsv/.jsonl/.parquet file
    tiny:<llama|gpt2|bert|opt>      a small randomly initialised model with a byte-level tokenizer

Text comes out as token windows (`draw_windows`), labelled data as (text, label) pairs with
a fixed train/validation/test split (`load_labelled`). Every bad source raises UserInputError.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from compression.errors import UserInputError
from compression.io import refuse_remote_code

from . import data, packaged, tiny, wiki

__all__ = [
    "LoadedModel", "LabelledData", "TASKS", "SPLITS", "check_source", "load_model", "load_documents",
    "draw_windows", "load_labelled", "describe_sources", "max_positions", "license_of",
]

TASKS = ("causal-lm", "classification")
SPLITS = ("eval", "calibration", "train")  # the order in which windows are handed out
SCHEMES = ("packaged:<name>", "hf:<id>[:<config>][:<split>]", "path:<dir or file>", "tiny:<llama|gpt2|bert|opt>")
_SCHEME_NAMES = ("packaged", "hf", "path", "tiny")
# Encoder-only model types: they classify, they are not causal LMs.
_ENCODERS = {"bert", "roberta", "distilbert", "mpnet", "deberta", "deberta-v2", "electra", "xlm-roberta", "albert",
             "modernbert"}
_TEXT_SOURCES = ("packaged:wiki, packaged:lee, packaged:tweets, path:<file .txt|.csv|.tsv|.jsonl|.parquet>, "
                 "hf:<dataset>[:<config>][:<split>]")
_LABELLED_SOURCES = "packaged:tweets, path:<file .csv|.tsv|.jsonl|.parquet>, hf:<dataset>[:<config>][:<split>]"
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


@dataclass
class LabelledData:
    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]
    label_names: list[str]


def _split_source(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
    if not sep or scheme not in _SCHEME_NAMES or not rest:
        raise UserInputError(f"source {source!r} is not a known source; allowed: {', '.join(SCHEMES)}")
    return scheme, rest


def check_source(source: str, kind: str) -> str:
    """Cheap check of a source string of `kind` (model, text or labelled): scheme, packaged name,
    tiny architecture, existing path. Nothing is loaded; UserInputError names what is wrong."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in _SCHEME_NAMES:
        raise UserInputError(f"source {source!r} has no known scheme; allowed: "
                             f"{', '.join(s + ':' for s in _SCHEME_NAMES)} (`lrsweep sources` lists them)")
    if not rest:
        raise UserInputError(f"source {source!r} names nothing after {scheme + ':'!r}")
    if scheme == "packaged":
        packaged.get(rest, kind)
    if scheme == "tiny":
        if kind != "model":
            raise UserInputError(f"source {source!r}: tiny: names a model, not {kind} data")
        if rest not in tiny.ARCHS:
            raise UserInputError(f"unknown tiny architecture {rest!r}; allowed: "
                                 f"{', '.join('tiny:' + a for a in tiny.ARCHS)}")
    if scheme == "path" and not Path(rest).expanduser().exists():
        raise UserInputError(f"source {source!r}: no file or folder {rest!r} (relative paths start at "
                             f"the current directory)")
    return source


# ---------------------------------------------------------------- models

def load_model(source: str, task: str = "causal-lm", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Model and tokenizer of `source`, in eval mode; the tokenizer has a pad token (eos when it
    had none) and pads on the right. task "classification" gives a sequence classifier whose head,
    when new, is initialised from `seed` (num_labels None keeps the checkpoint's own)."""
    if task not in TASKS:
        raise UserInputError(f"task {task!r} is not supported for source '{source}'; allowed: {', '.join(TASKS)}")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise UserInputError(f"num_labels for source '{source}' must be a positive integer; got {num_labels!r}")
    scheme, rest = _split_source(source)
    if scheme == "tiny":
        model, tokenizer = _tiny_model(source, rest, task, num_labels, dtype, seed)
    elif scheme == "packaged":
        where = packaged.model_dir(packaged.get(rest, "model"))
        model, tokenizer = _pretrained(source, where, task, num_labels, dtype, seed)
    elif scheme == "hf":
        if ":" in rest:
            raise UserInputError(f"source '{source}': a hub model is hf:<id> (config and split are for datasets)")
        what = f"could not load model '{rest}' from the Hugging Face hub"
        model, tokenizer = _guarded(source, what, _pretrained, source, rest, task, num_labels, dtype, seed,
                                    network=True)
    else:
        model, tokenizer = _path_model(source, Path(rest).expanduser(), task, num_labels, dtype, seed)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fallback is None:
            raise UserInputError(f"source '{source}': the tokenizer has no pad, eos, sep or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def max_positions(config) -> int | None:
    """The longest sequence the model has positions for (`max_position_embeddings`, GPT-2's
    `n_positions`), None when its config does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


@contextmanager
def _seeded(seed: int):
    """Seed the CPU generator for new weights (a fresh head) without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_task(source: str, model_type: str, task: str) -> None:
    if task == "causal-lm" and model_type in _ENCODERS:
        raise UserInputError(
            f"source '{source}' is an encoder ({model_type}), not a causal LM; allowed task: classification")


def _model_class(task: str):
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _tiny_model(source, arch, task, num_labels, dtype, seed):
    if arch not in tiny.ARCHS:
        raise UserInputError(f"source '{source}': unknown tiny architecture {arch!r}; allowed: "
                             + ", ".join(f"tiny:{a}" for a in tiny.ARCHS))
    tokenizer = tiny.byte_tokenizer(arch)
    config = tiny.tiny_config(arch, tokenizer)
    _check_task(source, config.model_type, task)
    if task == "classification":
        config.num_labels = num_labels or 2
    config.name_or_path = source
    with _seeded(seed):
        model = _model_class(task).from_config(config, dtype=dtype)
    return model, tokenizer


def _pretrained(source, where, task, num_labels, dtype, seed, **load_kw):
    """from_pretrained for a folder, a hub id, or (with gguf_file=) a GGUF file. Never runs code
    that comes with the model: `trust_remote_code=False`, and a model that names code of its own
    (`auto_map`) is refused before anything is loaded (a local folder) or after its config (the hub)."""
    load_kw["trust_remote_code"] = False
    if Path(where).is_dir():
        refuse_remote_code(where)
    config = AutoConfig.from_pretrained(where, **load_kw)
    if getattr(config, "auto_map", None):
        raise UserInputError(f"source '{source}' needs its own Python code (its config has auto_map "
                             f"{config.auto_map}); code that comes with a model is never run "
                             f"(trust_remote_code=False): use a model whose architecture transformers implements")
    _check_task(source, config.model_type, task)
    tokenizer = AutoTokenizer.from_pretrained(where, **load_kw)
    extra = {"num_labels": num_labels} if task == "classification" and num_labels else {}
    with _seeded(seed):
        model = _model_class(task).from_pretrained(where, dtype=dtype, **extra, **load_kw)
    return model, tokenizer


def _guarded(source: str, what: str, fn, *args, network: bool = False, **kw):
    """Run a loader; anything but a UserInputError becomes one that names the source."""
    try:
        return fn(*args, **kw)
    except UserInputError:
        raise
    except Exception as e:  # loaders raise OSError, ValueError, hub and JSON errors alike
        hint = (" It needs the network or the local Hugging Face cache (offline: HF_HUB_OFFLINE=1 uses only the "
                "cache); without a network use packaged:<name>, path:<dir> or tiny:<arch>.") if network else ""
        raise UserInputError(f"source '{source}': {what} ({type(e).__name__}: {str(e).strip()}).{hint}") from e


def _path_model(source, path: Path, task, num_labels, dtype, seed):
    if not path.exists():
        raise UserInputError(f"source '{source}': {path} does not exist; allowed: path:<model folder with "
                             "config.json> or path:<file.gguf>")
    if path.is_file() and path.suffix == ".gguf":
        return _guarded(source, "could not load the GGUF file", _pretrained, source, path.parent, task, num_labels,
                        dtype, seed, gguf_file=path.name)
    if path.is_dir() and (path / "config.json").exists():
        return _guarded(source, "could not load the model folder", _pretrained, source, path, task, num_labels,
                        dtype, seed)
    raise UserInputError(f"source '{source}': {path} is not a model; allowed: a folder with config.json "
                         "(Hugging Face format) or a .gguf file")


def license_of(source: str) -> str:
    """The licence of a model source, as its model card says (the `license:` of a folder's or
    the hub cache's README.md front matter; for packaged models, their hub card's), or a line
    saying it is unknown. Reads local files only."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    scheme, rest = _split_source(source)
    if scheme == "tiny":
        return "none (randomly initialised weights)"
    if scheme == "packaged":
        return packaged.get(rest, "model").license or "unknown"
    if scheme == "path":
        folder = Path(rest).expanduser()
        card = (folder.parent if folder.is_file() else folder) / "README.md"  # a .gguf file: its folder
    else:
        card = try_to_load_from_cache(rest, "README.md")
    try:
        meta = metadata_load(card) if isinstance(card, (str, Path)) and Path(card).is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        meta = None
    found = (meta or {}).get("license")
    return str(found) if found else "unknown: check the licence of the source model before sharing this model"


# ---------------------------------------------------------------- text

def load_documents(source: str, text_column: str | None = None) -> list[str]:
    """The plain-text documents of a text source. A .txt file holds one document per block of
    lines separated by blank lines; tables take `text_column` or detect it ("text", "sentence", ...)."""
    return list(_documents(source, text_column, _file_stamp(source)))


def _file_stamp(source: str) -> tuple[int, int] | None:
    """Identifies the version of a `path:` file so the document cache never serves a stale file."""
    scheme, _, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
    if scheme == "path":
        path = Path(rest).expanduser()
        if path.is_file():
            stat = path.stat()
            return stat.st_mtime_ns, stat.st_size
    return None


@functools.lru_cache(maxsize=8)
def _documents(source: str, text_column: str | None, stamp: tuple[int, int] | None) -> tuple[str, ...]:
    scheme, rest = _split_source(source)
    if scheme == "packaged":
        entry = packaged.get(rest, "text")
        path = entry.paths()[0]
        if rest == "wiki":
            docs = wiki.read_dump(path)
        elif rest == "lee":
            docs = [line.strip() for line in data.read_text(path).splitlines() if line.strip()]
        else:
            frame = _tweets_frame(path)
            docs = data.column_texts(frame, data.pick_column(frame, text_column or "text", (), "text", source))
            docs = list(dict.fromkeys(docs))  # the corpus repeats some tweets
    elif scheme == "path":
        path = _data_file(source, rest)
        if path.suffix.lower() == ".txt":
            docs = data.txt_documents(path)
        else:
            frame = data.read_table(path, source)
            docs = data.column_texts(frame, data.pick_column(frame, text_column, data.TEXT_COLUMNS, "text", source))
    elif scheme == "hf":
        frame = data.hf_table(source, rest)[0]
        docs = data.column_texts(frame, data.pick_column(frame, text_column, data.TEXT_COLUMNS, "text", source))
    else:
        raise UserInputError(f"source '{source}' is a model, not text; text sources: {_TEXT_SOURCES}")
    if not docs:
        raise UserInputError(f"source '{source}' contains no text")
    return tuple(docs)


def _data_file(source: str, rest: str) -> Path:
    path = Path(rest).expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"source '{source}': {path} {state}; data sources are files: "
                             + ", ".join(data.DATA_SUFFIXES))
    if path.suffix.lower() not in data.DATA_SUFFIXES:
        raise UserInputError(f"source '{source}': unsupported file type '{path.suffix}'; data files: "
                             + ", ".join(data.DATA_SUFFIXES))
    return path


def _tweets_frame(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, encoding="latin-1")


def draw_windows(source: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, counts: dict[str, int | None],
                 seed: int = 0, text_column: str | None = None) -> dict[str, torch.Tensor]:
    """Disjoint token windows [count, seq_len] for the keys of `counts` ("eval", "calibration", "train").

    The documents (exact repeats dropped, so the same text cannot land in two splits) are
    tokenized, joined with the eos (or sep) token into one stream and cut into
    all its non-overlapping windows; these are shuffled with `seed` and handed out in the fixed
    order eval, calibration, train. So no window is in two splits, and the eval windows depend only
    on the source, tokenizer, seq_len, seed and the eval count. A count of None takes every window
    the others leave (at most one None). When the tokenizer starts a text with BOS (Gemma, OPT),
    every window starts with BOS followed by seq_len - 1 stream tokens, as the model was trained.
    """
    unknown = [k for k in counts if k not in SPLITS]
    if unknown:
        raise UserInputError(f"source '{source}': unknown window split(s) {unknown}; allowed: {', '.join(SPLITS)}")
    if any(c is not None and (not isinstance(c, int) or c < 0) for c in counts.values()):
        raise UserInputError(f"source '{source}': window counts must be integers >= 0 or None; got {counts}")
    if sum(c is None for c in counts.values()) > 1:
        raise UserInputError(f"source '{source}': at most one split may ask for all remaining windows (None); "
                             f"got {counts}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise UserInputError(f"source '{source}': seq_len must be an integer >= 2; got {seq_len!r}")

    documents = list(dict.fromkeys(load_documents(source, text_column)))  # a repeated document could leak
    stream = _token_stream(documents, tokenizer)
    prefix = _bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    n_windows = len(stream) // body
    fixed = sum(c for c in counts.values() if c is not None)
    takes_rest = None in counts.values()
    rest = n_windows - fixed
    if rest < 0 or (takes_rest and rest == 0):
        asked = ", ".join(f"{k}={'all remaining' if c is None else c}" for k, c in counts.items())
        raise UserInputError(
            f"source '{source}' has too little text: {n_windows} windows of {seq_len} tokens "
            f"({len(stream)} tokens) are available, asked for {fixed}{' + at least 1' if takes_rest else ''} "
            f"({asked})")

    windows = stream[: n_windows * body].view(n_windows, body)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for split in SPLITS:
        if split not in counts:
            continue
        count = rest if counts[split] is None else counts[split]
        chosen = windows[order[start:start + count]]
        if prefix:
            chosen = torch.cat([torch.tensor(prefix).expand(count, 1), chosen], dim=1)
        out[split] = chosen.contiguous()
        start += count
    return out


def _token_stream(documents: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents tokenized (no special tokens), each followed by the eos (or sep) token."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        if separator is not None:
            stream.append(separator)
    return torch.tensor(stream, dtype=torch.long)


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


# ---------------------------------------------------------------- labelled data

def load_labelled(source: str, seed: int = 0, text_column: str | None = None,
                  label_column: str | None = None) -> LabelledData:
    """(text, label id) pairs split 80/10/10 into train/validation/test by a permutation drawn
    from `seed`; repeated texts are dropped first (the first kept), so the splits share no text.
    Columns are detected ("text", "sentence", ... / "label", "sentiment", ...) unless given."""
    scheme, rest = _split_source(source)
    class_names: dict[str, list[str]] = {}
    if scheme == "packaged":
        entry = packaged.get(rest, "text")
        if entry.kind != "labelled":
            raise UserInputError(f"source '{source}' has no labels; labelled sources: {_LABELLED_SOURCES}")
        frame = _tweets_frame(entry.paths()[0])
        text_column, label_column = text_column or "text", label_column or "sentiment"
    elif scheme == "path":
        path = _data_file(source, rest)
        if path.suffix.lower() == ".txt":
            raise UserInputError(f"source '{source}': a .txt file has no labels; labelled sources: "
                                 f"{_LABELLED_SOURCES}")
        frame = data.read_table(path, source)
    elif scheme == "hf":
        frame, class_names = data.hf_table(source, rest)
    else:
        raise UserInputError(f"source '{source}' is a model, not labelled data; labelled sources: "
                             f"{_LABELLED_SOURCES}")
    text_column = data.pick_column(frame, text_column, data.TEXT_COLUMNS, "text", source)
    label_column = data.pick_column(frame, label_column, data.LABEL_COLUMNS, "label", source)
    pairs, names = data.labelled_pairs(frame, text_column, label_column, class_names.get(label_column))
    if len(pairs) < 10:
        raise UserInputError(f"source '{source}' has {len(pairs)} labelled examples; at least 10 are needed "
                             "for a train/validation/test split")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(pairs) * _SPLIT_FRACTIONS[1])
    n_test = int(len(pairs) * _SPLIT_FRACTIONS[2])
    n_train = len(pairs) - n_val - n_test
    picked = [pairs[i] for i in order]
    return LabelledData(train=picked[:n_train], validation=picked[n_train:n_train + n_val],
                        test=picked[n_train + n_val:], label_names=names)


# ---------------------------------------------------------------- listing

def describe_sources() -> list[dict]:
    """One dict per source for `lrsweep sources`: name, kind, description, installed, install (pip line)."""
    rows = [{"name": f"packaged:{s.name}", "kind": s.kind, "description": s.description,
             "installed": s.installed(), "install": s.install_line()} for s in packaged.PACKAGED.values()]
    rows += [{"name": f"tiny:{arch}", "kind": "model",
              "description": f"random {arch} ({tiny.LAYERS} blocks, hidden {tiny.HIDDEN}, FFN {tiny.FFN}), "
                             "byte-level tokenizer, seeded",
              "installed": True, "install": ""} for arch in tiny.ARCHS]
    rows += [
        {"name": "hf:<id>[:<config>][:<split>]", "kind": "any",
         "description": "Hugging Face hub model or datasets dataset (needs the network or the local HF cache)",
         "installed": True, "install": ""},
        {"name": "path:<dir or file>", "kind": "any",
         "description": "local model folder (config.json) or .gguf; data file .txt (blank-line separated "
                        "documents), .csv, .tsv, .jsonl, .parquet",
         "installed": True, "install": ""},
    ]
    return rows
