"""save_compressed / load_compressed: identical logits after a round trip, clear errors on bad folders."""

import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from tiny_models import VOCAB, random_biases, tiny_config, tiny_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from compression.errors import UserInputError
from compression.io import COMPACT_WEIGHTS, INFO_FILE, load_compressed, save_compressed
from compression.targets import find_mlps, find_targets
from compression.layers import LowRankLinear
from compression.targets import dense_layer, dense_shape, dense_weight, layer_kind, set_dense_weight

ARCHS = ("llama", "gpt2", "bert", "opt", "distilbert", "gemma3", "mpnet")


def tied_llama() -> nn.Module:
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def low_rank_everything(model: nn.Module, skip: set[str] = frozenset()) -> None:
    """Replace every target (but `skip`) by a truncated-SVD LowRankLinear of a rank that varies by layer."""
    for i, t in enumerate(t for t in find_targets(model) if t.name not in skip):
        old = model.get_submodule(t.name)
        U, S, Vh = torch.linalg.svd(dense_weight(old).detach().double(), full_matrices=False)
        k = 3 + i % 5
        model.set_submodule(t.name, LowRankLinear.from_factors(U[:, :k] * S[:k], Vh[:k], old.bias,
                                                                 dtype=old.weight.dtype))


def mlp_layers(model: nn.Module) -> set[str]:
    return {n for g in find_mlps(model) for n in (*g.inputs, g.down)}


def narrow_mlps(model: nn.Module) -> list[int]:
    """Keep the first 20, 7, ... neurons of the MLPs (plain dense layers); return the widths."""
    widths = []
    for g, width in zip(find_mlps(model), (20, 7, 11)):
        for name in (*g.inputs, g.down):
            old = model.get_submodule(name)
            n_in, n_out, bias = dense_shape(old)
            W = dense_weight(old).detach()
            if name == g.down:
                n_in, W, b_new = width, W[:, :width], old.bias
            else:
                n_out, W, b_new = width, W[:width], None if old.bias is None else old.bias[:width]
            new = dense_layer(layer_kind(old), n_in, n_out, bias, old.weight.dtype, old.weight.device)
            set_dense_weight(new, W, b_new)
            model.set_submodule(name, new)
        widths.append(width)
    return widths


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["low_rank", "pruned", "both"])
def test_round_trip_identical_logits(tmp_path, arch, kind):
    model = random_biases(tiny_model(arch))
    mlp_names = mlp_layers(model)
    if kind in ("pruned", "both"):
        narrow_mlps(model)
    if kind == "low_rank":
        low_rank_everything(model)
    if kind == "both":  # attention low-rank, MLPs narrower
        low_rank_everything(model, skip=mlp_names)
    before = logits(model, IDS)
    path = save_compressed(model, tmp_path / "out", extra={"note": "hi"})
    loaded, tokenizer, info = load_compressed(path)
    assert tokenizer is None
    assert torch.equal(logits(loaded, IDS), before)
    assert type(loaded) is type(model) and not loaded.training
    assert info["extra"] == {"note": "hi"} and info["architecture"] == type(model).__name__
    n_low_rank = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert len(info["low_rank"]) == n_low_rank == sum(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert set(info["resized"]) == (set() if kind == "low_rank" else mlp_names)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    for name, module in model.named_modules():
        other = loaded.get_submodule(name)
        assert type(other) is type(module)
        if isinstance(module, LowRankLinear):
            assert other.rank == module.rank and other.has_bias == module.has_bias


def test_low_rank_layers_recorded(tmp_path):
    model = tiny_model("gpt2")
    low_rank_everything(model)
    info = json.loads((save_compressed(model, tmp_path / "m") / INFO_FILE).read_text())
    spec = info["low_rank"]["transformer.h.0.attn.c_attn"]
    assert spec == {"in_features": 64, "out_features": 192, "rank": 3, "bias": True}
    assert info["method"] is None and info["plan"] is None
    assert info["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_pruned_widths_recorded(tmp_path):
    model = tiny_model("llama")
    narrow_mlps(model)
    info = json.loads((save_compressed(model, tmp_path / "m") / INFO_FILE).read_text())
    assert info["resized"]["model.layers.1.mlp.up_proj"] == {"kind": "linear", "in_features": 64,
                                                             "out_features": 7, "bias": False}
    assert info["resized"]["model.layers.0.mlp.down_proj"]["in_features"] == 20
    assert info["low_rank"] == {}


@pytest.mark.parametrize("make", [tied_llama, lambda: tiny_model("bert", "causal-lm")])
def test_tied_embeddings_saved_once_and_retied(tmp_path, make):
    model = make()
    low_rank_everything(model)
    before = logits(model, IDS)
    path = save_compressed(model, tmp_path / "m")
    with safe_open(path / COMPACT_WEIGHTS, "pt") as f:
        keys = set(f.keys())
    loaded, _, info = load_compressed(path)
    assert "lm_head.weight" in info["tied"] or "cls.predictions.decoder.weight" in info["tied"]
    for alias, source in info["tied"].items():
        assert alias not in keys and source in keys
        assert loaded.get_parameter(alias) is loaded.get_parameter(source)
    assert torch.equal(logits(loaded, IDS), before)


def test_untied_embeddings_stay_untied(tmp_path):
    model = tiny_model("llama")
    loaded, _, info = load_compressed(save_compressed(model, tmp_path / "m"))
    assert info["tied"] == {}
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_bfloat16_round_trip(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    low_rank_everything(model)
    before = logits(model, IDS)
    loaded, _, info = load_compressed(save_compressed(model, tmp_path / "m"))
    assert info["dtype"] == "bfloat16" and loaded.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, IDS), before)


def test_tokenizer_saved_and_loaded(tmp_path):
    words = ["[UNK]", "[PAD]", "the", "cat", "sat"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    _, loaded, _ = load_compressed(save_compressed(tiny_model("llama"), tmp_path / "m", tokenizer=tokenizer))
    assert loaded("the cat sat dog")["input_ids"] == [2, 3, 4, 0]
    assert loaded.pad_token == "[PAD]"


def test_plan_recorded(tmp_path):
    class Plan:  # anything with .method and .to_dict() (a RankPlan)
        method = "whiten"

        def to_dict(self):
            return {"method": "whiten", "ranks": {"a": 3}}

    info = load_compressed(save_compressed(tiny_model("opt"), tmp_path / "m", plan=Plan()))[2]
    assert info["method"] == "whiten" and info["plan"] == {"method": "whiten", "ranks": {"a": 3}}


def test_overwrites_previous_compressed_folder(tmp_path):
    model = tiny_model("llama")
    save_compressed(model, tmp_path / "m")
    low_rank_everything(model)
    save_compressed(model, tmp_path / "m")
    loaded, _, info = load_compressed(tmp_path / "m")
    assert info["low_rank"] and torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left


def test_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        save_compressed(tiny_model("llama"), tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


def test_save_needs_a_hugging_face_model(tmp_path):
    with pytest.raises(UserInputError, match="PreTrainedModel"):
        save_compressed(nn.Linear(2, 2), tmp_path / "m")


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_compressed(tiny_model("llama"), tmp_path / "m", extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_unsupported_change_refused_at_save(tmp_path):
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm.weight = nn.Parameter(torch.ones(5))
    with pytest.raises(UserInputError, match="input_layernorm"):
        save_compressed(model, tmp_path / "m")


def test_bad_folders(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_compressed(tmp_path / "nope")
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)  # a normal HF folder: no lowrank.json
    with pytest.raises(UserInputError, match=f"missing {INFO_FILE}"):
        load_compressed(plain)

    model = tiny_model("llama")
    low_rank_everything(model)
    path = save_compressed(model, tmp_path / "m")
    info_text = (path / INFO_FILE).read_text()

    (path / INFO_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_compressed(path)
    (path / INFO_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserInputError, match="version 1"):
        load_compressed(path)

    info = json.loads(info_text)
    del info["tied"]
    (path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="missing \\['tied'\\]"):
        load_compressed(path)
    (path / INFO_FILE).write_text(json.dumps({**json.loads(info_text), "dtype": "float99"}))
    with pytest.raises(UserInputError, match="float99"):
        load_compressed(path)

    info = json.loads(info_text)
    info["low_rank"]["model.layers.0.self_attn.q_proj"]["rank"] += 1
    (path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="do not match"):
        load_compressed(path)

    info = json.loads(info_text)
    info["low_rank"]["model.layers.0.no_such_layer"] = info["low_rank"].pop("model.layers.0.self_attn.q_proj")
    (path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="does not match"):
        load_compressed(path)

    (path / INFO_FILE).write_text(info_text)
    (path / COMPACT_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(UserInputError):
        load_compressed(path)

    (path / INFO_FILE).write_text(json.dumps({**json.loads(info_text), "architecture": "os.system"}))
    with pytest.raises(UserInputError, match="not a model class of transformers"):
        load_compressed(path)


@pytest.mark.slow
def test_real_minilm_round_trip_with_tokenizer(tmp_path):
    from compression.apply import compress, decompose_model, plan_ranks
    from compression.calibration import collect_stats
    from trainables.sources import load_model

    loaded = load_model("packaged:minilm", task="classification", num_labels=3)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = ["the cat sat on the mat", "markets fell sharply on monday", "what a lovely day", "no comment"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    stats = collect_stats(model, [{**enc, "labels": torch.tensor([0, 1, 2, 1])}], task="classification",
                          progress=False)
    for method in ("svd", "id"):
        decs = decompose_model(model, stats, method)
        plan = plan_ranks(model, stats, method, 0.4, "uniform", decs)
        compressed = compress(model, stats, method, plan, decs, inplace=False)
        with torch.no_grad():
            before = compressed(**enc).logits
        back, back_tokenizer, info = load_compressed(save_compressed(compressed, tmp_path / method, tokenizer, plan))
        assert back_tokenizer(texts, return_tensors="pt", padding=True)["input_ids"].equal(enc["input_ids"])
        with torch.no_grad():
            assert torch.equal(back(**enc).logits, before)
        assert info["plan"]["achieved_ratio"] == pytest.approx(0.4, abs=0.01)
