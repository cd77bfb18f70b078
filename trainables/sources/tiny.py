"""`tiny:<arch>`: small randomly initialised models of real architectures, built offline.

Every tiny model has 2 blocks, hidden size 64, 4 attention heads (llama: 2 KV heads),
FFN width 128 and 512 positions. The tokenizer is byte-level (one token per UTF-8 byte,
plus the special tokens the architecture uses), built in code with `tokenizers`, so
nothing is downloaded and any text can be encoded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

HIDDEN, FFN, LAYERS, HEADS, POSITIONS = 64, 128, 2, 4, 512

# Special tokens per architecture: role -> token. They take the first ids, the 256 bytes follow.
_SPECIALS: dict[str, dict[str, str]] = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "opt": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "</s>", "eos_token": "</s>"},
    "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "mask_token": "[MASK]"},
}
ARCHS = tuple(_SPECIALS)


def byte_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the special tokens of `arch` (pad = eos where the arch has no pad)."""
    specials = _SPECIALS[arch]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials.values()))}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: sort for stable ids
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if arch == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=POSITIONS, **specials)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if arch == "bert":
        return BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=FFN, max_position_embeddings=POSITIONS, **ids)
    ids |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "llama":
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                           **ids)
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, **ids)
    return OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN, **ids)
