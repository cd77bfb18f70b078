"""Size of the calibration statistics (and of one method's decompositions) per model.

    python bench/stats_size.py

SmolLM2-135M and Gemma-3-270M are loaded from their packages; Llama-3-8B is built from its
shapes alone on the meta device (hidden 4096, 32 layers, FFN 14336, 32 heads / 8 KV heads,
vocabulary 128256), so nothing is downloaded or allocated. The statistics size is
`compression.calibration.estimate_stats_bytes` (float64: one Gram matrix per input group, shared
by q/k/v and by gate/up, plus the Fisher vectors of every targeted layer); it equals what
`collect_stats` returns (tests/test_limits.py checks that). The statistics live on the head
twice (the driver and the object store), and a node that runs decompositions pulls them once.

Decompositions, per SVD-family method (float32 factors U [m, r], U^T L W [r, n], r = min(m, n),
plus float64 singular values): what each trial of that method pulls from the object store.
Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.calibration import estimate_stats_bytes
from compression.targets import find_blocks, find_targets
from trainables.sources import load_model

PACKAGED = {"SmolLM2-135M": "packaged:smollm2-135m", "Gemma-3-270M": "packaged:gemma3-270m"}


def llama3_8b() -> nn.Module:
    """Llama-3-8B's architecture with no weights (meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def by_hand_llama3_8b() -> int:
    """The same figure from the shapes, without transformers: per block one Gram of the hidden
    size for q/k/v, one for o, one for gate/up, one of the FFN width for down; Fisher vectors
    (2 m + n per layer); one block-importance value per block."""
    h, f, layers, kv = 4096, 14336, 32, 8 * 128
    grams = 3 * h * h + f * f
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]  # q k v o gate up down: (out, in)
    vectors = sum(2 * m + n for m, n in shapes)
    return 8 * (layers * (grams + vectors) + layers)


def decompositions_bytes(model: nn.Module) -> int:
    total = 0
    for t in find_targets(model):
        m, n = t.out_features, t.in_features
        r = min(m, n)
        total += 4 * r * (m + n) + 2 * 8 * r
    return total


def row(name: str, model: nn.Module) -> str:
    targets = find_targets(model)
    params = sum(p.numel() for p in model.parameters())
    targeted = sum(t.out_features * t.in_features for t in targets)
    stats = estimate_stats_bytes(model, targets)
    return (f"| {name} | {params / 1e6:,.0f} M | {len(find_blocks(model))} | {len(targets)} | "
            f"{targeted / 1e6:,.0f} M | {stats / 1e9:,.3f} GB | {decompositions_bytes(model) / 1e9:,.2f} GB |")


def main() -> None:
    lines = ["| model | parameters | blocks | targeted layers | targeted parameters | calibration statistics "
             "(float64) | decompositions per SVD method (float32) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, source in PACKAGED.items():
        lines.append(row(name, load_model(source).model))
    big = llama3_8b()
    assert estimate_stats_bytes(big) == by_hand_llama3_8b(), "shape count and estimate disagree"
    lines.append(row("Llama-3-8B (from shapes)", big))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
