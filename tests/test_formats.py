"""The two export layouts on every architecture, with models compressed by the real pipeline
(statistics from `collect_stats`) by a low-rank method, the spectrum allocation and `id`:

- dense: plain transformers (no project code) loads it, with the dense config's shapes and
  parameter count, and gives the logits of `load_compressed` on the compact folder (<= 1e-4);
- compact: `AutoConfig` / `AutoModel*.from_pretrained` and the concrete class refuse it loudly;
- dtypes, shards, version 1 folders, permissions and bad arguments.
"""

import json
import os
import shutil

import pytest
import torch
import transformers
from tiny_models import ARCHS, VOCAB, tiny_batches, tiny_model

from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.densify import densify
from compression.errors import UserInputError
from compression.io import (
    COMPACT_INDEX,
    COMPACT_WEIGHTS,
    INFO_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
    save_dense,
)
from compression.layers import LowRankLinear

TRIALS = {"svd-uniform": ("svd", "uniform"), "whiten-fd-spectrum": ("whiten-fd", "spectrum"), "id": ("id", "uniform")}
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=ARCHS)
def calibrated(request):
    model = tiny_model(request.param, "causal-lm")
    stats = collect_stats(model, tiny_batches(model, n_batches=2, batch=3, seq_len=16), task="causal-lm",
                          progress=False)
    return model, stats


def compressed(model, stats, method: str, allocation: str, ratio: float = 0.4):
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, ratio, allocation, decs)
    return compress(model, stats, method, plan, decs, inplace=False), plan


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_class(folder):
    """The class config.json names, taken from transformers itself."""
    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


@pytest.mark.parametrize("trial", TRIALS)
def test_dense_export_loads_in_plain_transformers_with_the_compact_logits(calibrated, trial, tmp_path):
    model, stats = calibrated
    small, plan = compressed(model, stats, *TRIALS[trial])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    compact = save_compressed(small, tmp_path / "compact", plan=plan)
    dense = save_dense(small, tmp_path / "dense", plan=plan)

    plain = plain_class(dense).from_pretrained(dense).eval()
    assert type(plain) is type(model)
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    ours, _, info = load_compressed(compact)
    assert (logits(plain) - logits(ours)).abs().max() <= 1e-4
    assert torch.equal(logits(ours), logits(small))
    dense_info = json.loads((dense / INFO_FILE).read_text())
    assert dense_info["layout"] == "dense" and info["layout"] == "compact"
    assert dense_info["compressed_parameters"] == info["parameters"] == sum(p.numel() for p in small.parameters())
    assert dense_info["parameters"] == sum(p.numel() for p in model.parameters())
    # load_compressed reads the dense layout too (through from_pretrained)
    again, _, _ = load_compressed(dense)
    assert torch.equal(logits(again), logits(plain))


def test_plain_transformers_refuses_a_compact_folder(calibrated, tmp_path):
    model, stats = calibrated
    small, plan = compressed(model, stats, "svd", "uniform")
    compact = save_compressed(small, tmp_path / "compact", plan=plan)
    auto = transformers.AutoModelForMaskedLM if "MaskedLM" in type(model).__name__ else transformers.AutoModelForCausalLM
    for load in (auto.from_pretrained, transformers.AutoModel.from_pretrained, transformers.AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="compression.load_compressed"):
            load(compact)
    with pytest.raises(OSError, match=WEIGHTS_FILE):  # the concrete class finds no weights it could use
        type(model).from_pretrained(compact)
    assert not (compact / WEIGHTS_FILE).exists() and (compact / COMPACT_WEIGHTS).is_file()


def test_densify_keeps_the_function_and_the_caller_model(calibrated):
    model, stats = calibrated
    small, _ = compressed(model, stats, "id", "uniform")
    before = {k: v.clone() for k, v in small.state_dict().items()}
    dense = densify(small)
    assert (logits(dense) - logits(small)).abs().max() <= 1e-5  # zero columns add zeros
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            assert dense.get_submodule(name).weight.shape == module.weight.shape


def test_densify_refuses_a_layer_compression_does_not_make():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(UserInputError, match="q_proj"):
        densify(model)


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_bfloat16_export_round_trips(tmp_path, layout):
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_batches(model), task="causal-lm", progress=False)
    small, plan = compressed(model, stats, "whiten", "uniform")
    save = save_compressed if layout == "compact" else save_dense
    path = save(small, tmp_path / "m", plan=plan, dtype="bfloat16")
    assert small.dtype == torch.float32  # the caller's model is not cast
    loaded, _, info = load_compressed(path)
    assert info["dtype"] == "bfloat16" and loaded.dtype == torch.bfloat16
    if layout == "compact":
        assert torch.equal(logits(loaded), logits(small.to(torch.bfloat16)))
    else:
        plain = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert plain.dtype == torch.bfloat16
        expected = densify(small).to(torch.bfloat16).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_sharded_export_round_trips(tmp_path, layout):
    model = tiny_model("gpt2")
    stats = collect_stats(model, tiny_batches(model), task="causal-lm", progress=False)
    small, plan = compressed(model, stats, "svd", "uniform")
    save = save_compressed if layout == "compact" else save_dense
    path = save(small, tmp_path / "m", plan=plan, max_shard_size="40KB")
    index_file = path / (COMPACT_INDEX if layout == "compact" else "model.safetensors.index.json")
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((path / s).is_file() for s in shards)
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    loaded, _, _ = load_compressed(path)
    if layout == "compact":
        assert torch.equal(logits(loaded), logits(small))
    else:
        plain = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert (logits(plain) - logits(small)).abs().max() <= 1e-4
    (path / shards[1]).unlink()
    with pytest.raises(UserInputError):
        load_compressed(path)


def test_version_1_folders_still_load(tmp_path):
    """What version 1 wrote: the dense config.json, model.safetensors, no layout or model type."""
    model = tiny_model("opt")
    stats = collect_stats(model, tiny_batches(model), task="causal-lm", progress=False)
    small, plan = compressed(model, stats, "whiten", "type")
    path = save_compressed(small, tmp_path / "v1", plan=plan)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="opt", architectures=["OPTForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    (path / COMPACT_WEIGHTS).rename(path / WEIGHTS_FILE)
    info = json.loads((path / INFO_FILE).read_text())
    for key in ("layout", "model_type", "compressed_parameters"):
        del info[key]
    (path / INFO_FILE).write_text(json.dumps({**info, "version": 1}))
    loaded, _, info = load_compressed(path)
    assert info["version"] == 1 and info["layout"] == "compact"
    assert torch.equal(logits(loaded), logits(small))


def test_folders_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        for save in (save_compressed, save_dense):
            path = save(tiny_model("llama"), tmp_path / save.__name__)
            assert path.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_bad_arguments_write_nothing(tmp_path):
    model = tiny_model("llama")
    for save in (save_compressed, save_dense):
        with pytest.raises(UserInputError, match="allowed: float32, bfloat16, float16"):
            save(model, tmp_path / "m", dtype="float64")
        for size in ("5XB", 0, "lots", "0GB", "-1GB"):
            with pytest.raises(UserInputError, match="max shard size"):
                save(model, tmp_path / "m", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []
    # a dense export replaces a compact one (and back), never another folder
    save_compressed(model, tmp_path / "m")
    save_dense(model, tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file() and not (tmp_path / "m" / COMPACT_WEIGHTS).exists()
    shutil.rmtree(tmp_path / "m")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        save_dense(model, tmp_path / "m")
