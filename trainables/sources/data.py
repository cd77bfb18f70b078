"""Text and labelled data from local files (`path:`) and Hugging Face datasets (`hf:`).

File formats: `.txt` (documents separated by blank lines; no labels), `.csv` / `.tsv`
(UTF-8, else latin-1), `.jsonl` (one JSON object a line) and `.parquet`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from compression.errors import UserInputError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
DATA_SUFFIXES = (".txt",) + TABLE_SUFFIXES
# Tried in order (case-insensitively) when no column is given.
TEXT_COLUMNS = ("text", "sentence", "content", "document", "review", "tweet", "body", "sentence1", "question")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target")
_SPLITS = ("train", "test", "validation", "valid", "dev")


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def txt_documents(path: Path) -> list[str]:
    """A .txt file: one document per block of lines separated by blank lines."""
    blocks, current = [], []
    for line in read_text(path).splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current).strip())
            current = []
    if current:
        blocks.append("\n".join(current).strip())
    return blocks


def read_table(path: Path, source: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            try:
                return pd.read_csv(path, sep=sep, encoding="utf-8")
            except UnicodeDecodeError:
                return pd.read_csv(path, sep=sep, encoding="latin-1")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pandas/pyarrow parse errors are ValueError or OSError subclasses
        raise UserInputError(f"source '{source}': cannot read {path.name} as {suffix[1:]}: {e}") from e
    raise UserInputError(
        f"source '{source}': unsupported file type '{suffix or path.name}'; data files: "
        + ", ".join(DATA_SUFFIXES))


def parse_hf(source: str, rest: str) -> tuple[str, str | None, str | None]:
    """`<id>[:<config>][:<split>]` -> (id, config, split). With one extra part it is a split
    when it looks like one (train, test, validation, valid, dev, or a slice such as train[:10%])."""
    parts = re.split(r":(?![^\[]*\])", rest)  # a slice such as train[:10%] keeps its colon
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise UserInputError(f"source '{source}' is malformed; expected hf:<id>[:<config>][:<split>]")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        extra = parts[1]
        if extra.split("[")[0] in _SPLITS:
            return parts[0], None, extra
        return parts[0], extra, None
    return parts[0], None, None


def hf_table(source: str, rest: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A Hugging Face dataset split (default "train") as a frame, and the class names of its
    ClassLabel columns."""
    dataset_id, config, split = parse_hf(source, rest)
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, config, split=split or "train")
    except Exception as e:  # hub, network and dataset-script errors have no common base class
        raise UserInputError(
            f"source '{source}': could not load dataset '{dataset_id}' (config {config}, split {split or 'train'}) "
            f"from the Hugging Face hub ({type(e).__name__}: {str(e).strip()}). It needs the network or the local "
            f"datasets cache (offline: HF_HUB_OFFLINE=1 uses only the cache); without a network use "
            f"packaged:<name> or path:<file>.") from e
    class_names = {name: list(feature.names) for name, feature in dataset.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    return dataset.to_pandas(), class_names


def pick_column(frame: pd.DataFrame, given: str | None, candidates: tuple[str, ...], what: str,
                source: str) -> str:
    """The column `given`, else the first of `candidates` present (case-insensitive); for text,
    else the only string column."""
    columns = [str(c) for c in frame.columns]
    if given is not None:
        if given in columns:
            return given
        raise UserInputError(f"source '{source}' has no {what} column '{given}'; columns: {', '.join(columns)}")
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    if what == "text":
        strings = [c for c in columns if pd.api.types.is_string_dtype(frame[c]) or frame[c].dtype == object]
        if len(strings) == 1:
            return strings[0]
    raise UserInputError(
        f"source '{source}' has no {what} column (looked for {', '.join(candidates)}); columns: "
        f"{', '.join(columns)}; name one with {what}_column=")


def column_texts(frame: pd.DataFrame, column: str) -> list[str]:
    texts = frame[column].dropna().astype(str).str.strip()
    return texts[texts != ""].tolist()


def labelled_pairs(frame: pd.DataFrame, text_column: str, label_column: str,
                   class_names: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(text, label id) pairs without missing values and without repeated texts (the first is kept,
    so no text can land in two splits). String labels are numbered in sorted order; integer labels
    keep their order (mapped to 0..K-1); `class_names` (e.g. a ClassLabel's) name integer labels."""
    frame = frame[[text_column, label_column]].dropna()
    texts = frame[text_column].astype(str).str.strip()
    frame = frame.assign(**{text_column: texts})
    frame = frame[texts != ""].drop_duplicates(subset=text_column, keep="first")
    values = frame[label_column].tolist()
    uniques = sorted(set(values))
    if class_names is not None and all(isinstance(v, int) and 0 <= v < len(class_names) for v in uniques):
        names = list(class_names)
        ids = values
    else:
        names = [str(v) for v in uniques]
        index = {v: i for i, v in enumerate(uniques)}
        ids = [index[v] for v in values]
    return list(zip(frame[text_column].tolist(), (int(i) for i in ids))), names
