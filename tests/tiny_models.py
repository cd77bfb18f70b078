"""Tiny, randomly initialised, seeded models of every supported architecture, and calibration batches.

For tests across the project (import as `from tiny_models import ARCHS, tiny_model, tiny_batches`):

    model = tiny_model("llama")                          # LlamaForCausalLM, hidden 64, 2 blocks, FFN 128
    model = tiny_model("mpnet", task="classification")   # MPNetForSequenceClassification, 3 labels
    batches = tiny_batches(model, n_batches=2, batch=3, seq_len=16, seed=0)

Every model: vocabulary 100, hidden 64, 2 blocks, 4 heads (llama 2 KV heads, gemma3 1 KV head), FFN 128,
pad token 0, float32, eval mode. Weights are drawn with std 0.1 (instead of the usual 0.02) so that
activations, gradients and block importances are far from degenerate even at this size.

Tasks: "causal-lm" (a ...ForCausalLM; BERT as a decoder, BertLMHeadModel), "classification"
(...ForSequenceClassification), "base" (AutoModel, no head: what MiniLM is loaded as). DistilBERT and
MPNet have no causal-LM class: for "causal-lm" they get their masked-LM model, which also returns
[batch, seq, vocab] logits so the causal-LM loss code runs on them (attention stays bidirectional).
"""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

ARCHS = ("bert", "distilbert", "gpt2", "opt", "llama", "gemma3", "mpnet")
TASKS = ("causal-lm", "classification", "base")
VOCAB, HIDDEN, LAYERS, HEADS, FFN, MAX_POS = 100, 64, 2, 4, 128, 64

_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)


def tiny_config(arch: str, num_labels: int = 3) -> tf.PretrainedConfig:
    """The config of `tiny_model(arch)`."""
    common = dict(_SPECIAL, vocab_size=VOCAB, num_labels=num_labels)
    configs = {
        "bert": lambda: tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=FFN, max_position_embeddings=MAX_POS, **common),
        "distilbert": lambda: tf.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                                  max_position_embeddings=MAX_POS, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                      n_positions=MAX_POS, **common),
        "opt": lambda: tf.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    ffn_dim=FFN, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN,
                                    **common),
        "llama": lambda: tf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=2, intermediate_size=FFN,
                                        max_position_embeddings=MAX_POS, **common),
        "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                              num_attention_heads=HEADS, num_key_value_heads=1, head_dim=16,
                                              intermediate_size=FFN, max_position_embeddings=MAX_POS,
                                              sliding_window=8, **common),
        "mpnet": lambda: tf.MPNetConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=FFN, max_position_embeddings=MAX_POS, **common),
    }
    if arch not in configs:
        raise ValueError(f"arch {arch!r}: allowed {', '.join(ARCHS)}")
    return configs[arch]()


def tiny_model(arch: str, task: str = "causal-lm", seed: int = 0, num_labels: int = 3) -> nn.Module:
    """A seeded random model of `arch` for `task` (see the module docstring); the global RNG is untouched."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: allowed {', '.join(TASKS)}")
    config = tiny_config(arch, num_labels)
    if task == "causal-lm" and arch == "bert":
        config.is_decoder = True
    auto = {
        "causal-lm": tf.AutoModelForMaskedLM if arch in ("distilbert", "mpnet") else tf.AutoModelForCausalLM,
        "classification": tf.AutoModelForSequenceClassification,
        "base": tf.AutoModel,
    }[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    return model.eval()


def tiny_batches(model: nn.Module, n_batches: int = 2, batch: int = 3, seq_len: int = 16, seed: int = 0,
                 pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random calibration batches: input_ids, attention_mask (right padding), and labels for classifiers.

    With `pad`, every row but the first of each batch is shortened to a random length in
    [seq_len // 2, seq_len - 1]; padded positions hold the pad token 0 and mask 0.
    """
    g = torch.Generator().manual_seed(seed)
    vocab, num_labels = model.config.vocab_size, model.config.num_labels
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        if pad:
            for row in range(1, batch):
                length = int(torch.randint(seq_len // 2, seq_len, (1,), generator=g))
                mask[row, length:] = 0
        ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
        b = {"input_ids": ids, "attention_mask": mask}
        if classifier:
            b["labels"] = torch.randint(0, num_labels, (batch,), generator=g)
        out.append(b)
    return out


def random_biases(model: nn.Module) -> nn.Module:
    """Give every bias random values (the tiny models start with zero biases, which would hide bias bugs)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
