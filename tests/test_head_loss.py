"""The chunked next-token loss through the output layer equals the plain cross-entropy, and the
finetune loop uses it only where the logits are a plain linear layer on the hidden states."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

import trainables.finetune as finetune_module
import trainables.head_loss as head_loss
from trainables.finetune import FinetuneConfig, finetune
from trainables.head_loss import IGNORE, chunked_cross_entropy, split_head

VOCAB = 64
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=64)


def head_and_rows(bias: bool, dtype=torch.float64, tokens=23, d=8, vocab=11, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(d, vocab, bias=bias).to(dtype)
    hidden = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    targets[::5] = IGNORE
    return head, hidden, targets


def gradients(loss, head, hidden):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("rows", [1, 3, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_are_the_plain_cross_entropy_s(monkeypatch, rows, bias):
    head, hidden, targets = head_and_rows(bias)
    monkeypatch.setattr(head_loss, "_CHUNK_ELEMENTS", rows * head.out_features)
    plain = F.cross_entropy(head(hidden), targets, ignore_index=IGNORE, reduction="sum")
    chunked = chunked_cross_entropy(hidden, head, targets)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)  # accumulated in float32
    for got, want in zip(gradients(chunked * 0.37, head, hidden), gradients(plain * 0.37, head, hidden)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_frozen_head_gets_no_gradient_and_every_target_ignored_gives_zero():
    head, hidden, targets = head_and_rows(bias=True)
    head.requires_grad_(False)
    loss = chunked_cross_entropy(hidden, head, torch.full_like(targets, IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(hidden.grad) == 0
    assert head.weight.grad is None and head.bias.grad is None


def test_under_bf16_autocast_the_products_run_in_bf16_like_the_plain_head():
    head, hidden, targets = head_and_rows(bias=False, dtype=torch.float32, tokens=64, d=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")
        chunked = chunked_cross_entropy(hidden, head, targets)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)
    exact = F.cross_entropy(head(hidden.double().float()), targets, ignore_index=IGNORE, reduction="sum")
    assert chunked.item() != pytest.approx(exact.item(), rel=1e-6)  # really computed in bf16


def test_the_split_is_found_for_plain_heads_and_refused_for_scaled_or_capped_logits():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 12))
    llama = LlamaForCausalLM(LlamaConfig(**SMALL)).train()
    assert split_head(llama, ids) == (llama.model, llama.lm_head)
    assert llama.training  # the check puts the model back in its mode
    assert split_head(GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0)), ids) is None
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5))
    assert split_head(gemma2, ids) is None
    assert split_head(nn.Linear(3, 3), ids) is None


@pytest.mark.parametrize("tied", [False, True])
def test_finetune_trains_the_same_through_the_chunked_loss(monkeypatch, tied):
    """Full finetuning (the head trains; tied: its weight is also the embedding's) gives the same
    losses and weights with the chunked loss as with the plain one."""
    windows = (torch.randint(0, VOCAB, (12, 1), generator=torch.Generator().manual_seed(1)) + torch.arange(16)) % VOCAB
    config = FinetuneConfig(steps=4, lr=3e-3, batch_size=4)
    trained = []
    for chunked in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied)).double()  # Adam magnifies float32 rounding
        if not chunked:
            monkeypatch.setattr(finetune_module, "split_head", lambda *args: None)
        calls = []
        original = head_loss._ChunkedCrossEntropy.apply
        monkeypatch.setattr(head_loss._ChunkedCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a))
        result = finetune(model, "causal-lm", windows, config)
        assert len(calls) == (4 if chunked else 0)
        trained.append((result.losses, model.state_dict()))
    (losses, weights), (plain_losses, plain_weights) = trained
    assert losses == pytest.approx(plain_losses, rel=1e-10)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, plain_weights[name], rtol=1e-9, atol=1e-11)
