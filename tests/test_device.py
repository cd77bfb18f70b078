"""Decompositions move between devices (`.to`), and compression on CUDA matches the CPU.

The CUDA tests skip without a GPU; the rest run anywhere (the `meta` device stands in for a
second device: moving there must touch every tensor and keep every dtype)."""

import copy

import pytest
import torch
from tiny_models import tiny_batches, tiny_model

from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.methods import LowRankDecomposition, NeuronDecomposition

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
METHODS = ("svd", "fwsvd", "whiten", "whiten-fw", "whiten-fd", "id")


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    batches = tiny_batches(model)
    return model, batches, collect_stats(model, batches, progress=False)


def tensors_of(dec) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(dec).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", ["whiten-fd", "fwsvd", "id"])
def test_to_moves_every_tensor_and_keeps_dtypes(llama, method):
    model, _, stats = llama
    decs = decompose_model(model, stats, method)
    dec = next(iter(decs.values()))
    assert isinstance(dec, NeuronDecomposition if method == "id" else LowRankDecomposition)
    moved = dec.to("meta")
    before, after = tensors_of(dec), tensors_of(moved)
    assert before.keys() == after.keys() and len(before) >= 4
    for name, t in after.items():
        assert t.device.type == "meta" and t.dtype == before[name].dtype, name
    assert all(t.device.type == "cpu" for t in tensors_of(dec).values())  # the original is untouched
    assert (moved.method, moved.max_rank, moved.out_features) == (dec.method, dec.max_rank, dec.out_features)


@pytest.mark.parametrize("method", ["whiten", "id"])
def test_to_cpu_copy_truncates_the_same(llama, method):
    model, _, stats = llama
    dec = next(iter(decompose_model(model, stats, method).values()))
    copy_ = dec.to("cpu")
    k = dec.max_rank // 2
    pieces = (lambda d: d.select(k)) if method == "id" else (lambda d: d.truncate(k))
    for a, b in zip(pieces(dec), pieces(copy_)):
        assert torch.equal(a, b)
    assert torch.equal(dec.loss_curve(), copy_.loss_curve())


@cuda
@pytest.mark.parametrize("method", METHODS)
def test_decompositions_on_cuda_match_the_cpu(llama, method):
    """float64 math on the GPU: the same factors (to rounding) and the same loss curves."""
    model, _, stats = llama
    on_cpu = decompose_model(model, stats, method)
    on_gpu = decompose_model(model, stats, method, device="cuda")
    for name, dec in on_cpu.items():
        gpu = on_gpu[name]
        assert all(t.is_cuda for t in tensors_of(gpu).values())
        torch.testing.assert_close(gpu.loss_curve().cpu(), dec.loss_curve(), rtol=1e-6, atol=1e-9)
        back = gpu.to("cpu")
        k = max(1, dec.max_rank // 3)
        if method == "id":
            assert torch.equal(back.select(k)[0], dec.select(k)[0])  # the same neurons kept
        else:
            a, b = back.truncate(k, dtype=torch.float64)
            a0, b0 = dec.truncate(k, dtype=torch.float64)
            torch.testing.assert_close(a @ b, a0 @ b0, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("method", ["whiten-fd", "id"])
def test_compress_on_cuda_gives_the_cpu_model(llama, method):
    """What a GPU trial does: decompositions arrive on the CPU, move to the trial's device with
    the model, and compression happens there; the logits match the CPU-compressed model."""
    model, batches, stats = llama
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, 0.4, "uniform", decs)
    on_cpu = compress(model, stats, method, plan, decs, inplace=False)
    on_gpu = copy.deepcopy(model).to("cuda")
    compress(on_gpu, stats, method, plan, {k: d.to("cuda") for k, d in decs.items()})
    assert all(p.is_cuda for p in on_gpu.parameters())
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        expected = on_cpu(**batch).logits
        got = on_gpu(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@cuda
def test_a_sweep_that_reserves_a_gpu_calibrates_on_it(tmp_path, monkeypatch):
    """prepare() runs the calibration pass on the GPU the sweep reserves; the statistics come back
    on the CPU and equal the CPU pass's to float32 accuracy."""
    from sweeps.prepare import prepare
    from sweeps.spec import parse_spec

    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"document {i} " + "some words of text " * 40 for i in range(30)))
    base = {"name": "g", "model": "tiny:llama", "storage": str(tmp_path),
            "task": {"type": "causal-lm", "eval": f"path:{text}", "seq_len": 32, "eval_windows": 2},
            "calibration": {"samples": 4, "batch_size": 2}, "grid": {"method": ["whiten-fd"], "ratio": [0.3]}}
    on_gpu = prepare(parse_spec(base | {"resources": {"gpu": 1}}), progress=False).stats
    assert on_gpu.meta["device"].startswith("cuda") and on_gpu.block_importance.device.type == "cpu"
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cpu-cache"))  # the same key: computed again, on the CPU
    on_cpu = prepare(parse_spec(base), progress=False).stats
    assert on_cpu.meta["device"] == "cpu"
    for g in on_cpu.grams:
        torch.testing.assert_close(on_gpu.grams[g], on_cpu.grams[g], rtol=1e-5, atol=1e-6)
