"""Frozen linear weights held in the autocast dtype while training (trainables.frozen_cast): the
same training bit for bit, evaluations and the end see the float32 weights, embeddings untouched."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model

import trainables.finetune as finetune_module
from trainables.finetune import FinetuneConfig, finetune
from trainables.frozen_cast import FrozenLinearCast

# PEFT asks transformers a deprecated question while adding adapters (trainables.adapters hides it too)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*deprecated:FutureWarning")


def windows():
    return (torch.arange(16) + torch.randint(0, 50, (16, 1), generator=torch.Generator().manual_seed(0))) % 100


def lora_model():
    torch.manual_seed(0)
    model = tiny_model("llama")
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def test_cast_holds_frozen_linears_in_the_dtype_and_restores_the_same_tensors():
    model = lora_model()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad and m is not head]
    originals = {id(m): m.weight.detach() for m in frozen}
    cast = FrozenLinearCast(model, torch.bfloat16)
    cast.cast()
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the adapters
    assert head.weight.dtype == embedding.weight.dtype == torch.float32  # a lookup is not autocast
    for m in frozen:
        torch.testing.assert_close(m.weight.float(), originals[id(m)], rtol=2 ** -8, atol=0)
    cast.restore()
    assert all(m.weight.dtype == torch.float32 and m.weight.data_ptr() == originals[id(m)].data_ptr() for m in frozen)


def test_training_is_the_same_with_and_without_the_cast_and_evaluations_see_float32(monkeypatch):
    config = FinetuneConfig(steps=4, lr=1e-2, batch_size=4, eval_every=2, cpu_precision="bf16")
    runs = []
    for cast in (True, False):
        model = lora_model()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        if not cast:
            monkeypatch.setattr(finetune_module, "FrozenLinearCast", lambda *args: _NoCast())
        base = next(m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad
                    and m is not model.get_output_embeddings())
        trained_with = set()
        base.register_forward_pre_hook(lambda module, args: trained_with.add(module.weight.dtype) if module.training else None)
        seen = set()
        result = finetune(model, "causal-lm", windows(), config,
                          on_eval=lambda step: seen.update(p.dtype for p in model.parameters()))
        assert seen == {torch.float32}
        assert trained_with == {torch.bfloat16 if cast else torch.float32}
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
        runs.append((result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (losses, adapters), (plain_losses, plain_adapters) = runs
    assert losses == plain_losses
    assert adapters.keys() == plain_adapters.keys() and all(torch.equal(adapters[n], plain_adapters[n]) for n in adapters)


class _NoCast:
    def cast(self):
        pass

    def restore(self):
        pass
