"""Perplexity and classification metrics against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from compression.errors import UserInputError
from trainables.evaluation import EvalResult, classification_metrics, evaluate, perplexity


class SuccessorLM(nn.Module):
    """Fixed next-token distribution: token (x + 1) mod V gets probability p_next, the rest share 1 - p_next."""

    def __init__(self, vocab: int = 4, p_next: float = 0.7):
        super().__init__()
        self.vocab, self.p_next = vocab, p_next
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, **kwargs):
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p_next) / (self.vocab - 1))
        probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p_next)
        return SimpleNamespace(logits=probs.log() + 5.0)  # a constant shift must not matter


class UnigramLM(nn.Module):
    """Same distribution `probs` at every position, whatever the input."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_perplexity_of_successor_model_predicts_next_token():
    # every predicted token is the successor of its predecessor: NLL = -log 0.7 exactly
    windows = torch.tensor([[0, 1, 2, 3, 0], [2, 3, 0, 1, 2]])
    result = perplexity(SuccessorLM(p_next=0.7), windows, batch_size=1)
    assert result.metric == "perplexity"
    assert result.value == pytest.approx(1 / 0.7, rel=1e-6)
    # misaligned (target = current token) would give p = 0.1 everywhere: perplexity 10
    same = torch.tensor([[1, 1, 1, 1]])
    assert perplexity(SuccessorLM(p_next=0.7), same).value == pytest.approx(10.0, rel=1e-6)


def test_perplexity_weights_every_token_equally_across_uneven_batches():
    probs = [0.1, 0.2, 0.3, 0.4]
    windows = torch.tensor([[0, 0, 0], [0, 3, 3], [2, 1, 1]])  # first token of each window is never predicted
    predicted = [0, 0, 3, 3, 1, 1]
    nll = -sum(math.log(probs[t]) for t in predicted) / len(predicted)
    for batch_size in (1, 2, 3, 8):  # batch_size 2: batches of 2 and 1 windows
        result = perplexity(UnigramLM(probs), windows, batch_size=batch_size)
        assert result.value == pytest.approx(math.exp(nll), rel=1e-6)
        assert result.extra["nll"] == pytest.approx(nll, rel=1e-6)
        assert result.extra["predicted_tokens"] == 6
        assert result.tokens == 9
        assert result.seconds > 0 and result.tokens_per_s == pytest.approx(9 / result.seconds)


def test_perplexity_of_tiny_llama_matches_model_loss_batch_invariant_and_deterministic():
    model = tiny_llama()
    windows = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # each window has T-1 predicted tokens, so the mean of window losses is the token mean
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    values = [perplexity(model, windows, batch_size=b).value for b in (1, 2, 5, 8)]
    assert values[0] == pytest.approx(expected, rel=1e-5)
    for value in values[1:]:
        assert value == pytest.approx(values[0], rel=1e-5)
    assert perplexity(model, windows, batch_size=2).value == values[1]  # bit-identical on a rerun
    # a random model over 64 tokens is close to uniform
    assert 40 < values[0] < 100


def test_perplexity_restores_training_mode():
    model = tiny_llama().train()
    perplexity(model, torch.zeros(1, 4, dtype=torch.long))
    assert model.training
    model.eval()
    perplexity(model, torch.zeros(1, 4, dtype=torch.long))
    assert not model.training


@pytest.mark.parametrize(
    "windows, batch_size",
    [
        (torch.zeros(4, dtype=torch.long), 1),  # not 2-d
        (torch.zeros(2, 1, dtype=torch.long), 1),  # nothing to predict
        (torch.zeros(0, 5, dtype=torch.long), 1),
        (torch.zeros(2, 5), 1),  # float
        (torch.zeros(2, 5, dtype=torch.long), 0),
    ],
)
def test_perplexity_bad_input(windows, batch_size):
    with pytest.raises(UserInputError):
        perplexity(UnigramLM([0.5, 0.5]), windows, batch_size=batch_size)


class DigitTokenizer:
    """Tokenizes a text into the integer values of its whitespace-separated words, padded with 0."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[int(w) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class FirstTokenClassifier(nn.Module):
    """Predicts the class named by the first token."""

    def __init__(self, num_labels: int = 3):
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=nn.functional.one_hot(input_ids[:, 0], self.config.num_labels).float())


def test_classification_metrics_hand_values():
    # true 0 0 1 1 2 2, predicted 0 1 1 1 2 0
    examples = [("0 5", 0), ("1 5 5", 0), ("1", 1), ("1 7", 1), ("2 2 2 2", 2), ("0", 2)]
    # per-class F1: class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5; class 2 P=1 R=1/2 -> 2/3
    for batch_size in (1, 4, 32):
        result = classification_metrics(FirstTokenClassifier(), DigitTokenizer(), examples, batch_size=batch_size)
        assert result.metric == "accuracy"
        assert result.value == pytest.approx(4 / 6)
        assert result.extra["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
        assert result.tokens == 13  # real tokens (2+3+1+2+4+1), padding excluded


def test_classification_metrics_truncates_and_counts_unpredicted_class():
    examples = [("0 1 1 1", 0), ("0", 1)]  # class 1 never predicted: its F1 is 0
    result = classification_metrics(FirstTokenClassifier(2), DigitTokenizer(), examples, max_length=2)
    assert result.value == pytest.approx(0.5)
    assert result.extra["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert result.tokens == 3


@pytest.mark.parametrize("examples", [[], [("text", 3)], [("text", -1)], [("text",)], [(1, 0)], [("text", 0.5)]])
def test_classification_metrics_bad_examples(examples):
    with pytest.raises(UserInputError):
        classification_metrics(FirstTokenClassifier(3), DigitTokenizer(), examples)


def test_evaluate_dispatches_and_rejects_bad_task():
    windows = torch.tensor([[0, 1, 2, 3]])
    result = evaluate(SuccessorLM(), "causal-lm", windows, batch_size=1)
    assert isinstance(result, EvalResult) and result.value == pytest.approx(1 / 0.7, rel=1e-6)
    result = evaluate(FirstTokenClassifier(), "classification", [("2", 2)], tokenizer=DigitTokenizer())
    assert result.value == 1.0 and result.extra["macro_f1"] == 1.0
    with pytest.raises(UserInputError, match="causal-lm, classification"):
        evaluate(SuccessorLM(), "seq2seq", windows)
    with pytest.raises(UserInputError, match="tokenizer"):
        evaluate(FirstTokenClassifier(), "classification", [("2", 2)])
