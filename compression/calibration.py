"""Calibration statistics: one forward + backward pass over calibration batches (forward only
when no method needs gradients: `collect_stats(..., gradients=False)`).

What is collected (padding tokens, attention_mask == 0, are left out of everything):

- `grams[g]` = sum over tokens of x x^T (float64) for each input group g: layers that read the same
  tensor (q/k/v, gate/up) share one Gram, computed once. `tokens[g]` = number of tokens summed.
- `row_fisher[t]`, `col_fisher[t]`: the empirical weight Fisher F = sum over batches of (dL/dW)^2,
  L = summed loss of the batch, reduced at once to rows (sum_j F_ij, [out]) and input features
  (sum_i F_ij, [in]); the full F is never stored. Only with `weight_fisher=True` (the default):
  without it the backward pass computes no weight gradient at all (the activations' only: 38 s
  against 42 s on SmolLM2), for methods that read the neuron Fisher alone (whiten-fd, id-fd, hybrid).
- `neuron_fisher[t]`: g_i = mean over tokens of (dl/dy_i)^2 with l the SUM of the token losses, so the
  gradient at each token is that token's own (not divided by the batch size).
- With `fisher="sampled"` every Fisher statistic uses labels drawn from the model's own softmax
  (seeded) instead of the data's: the Monte Carlo Fisher, an unbiased estimate of the Gauss-Newton
  curvature, where the data labels give the empirical Fisher (the default).
- `block_importance`: ShortGPT's Block Influence (Men et al. 2024), BI_b = 1 - mean over tokens of
  cos(h_in, h_out) of block b. Chosen because it measures directly how much a block changes the
  residual stream, is scale-free (in [0, 2], comparable across blocks and models without
  normalisation), needs no labels and is the standard criterion for depth-wise layer importance. A
  Fisher-based score would add a loss signal, but its scale grows with depth-wise gradient norms and
  would need an extra normalisation choice.

Losses: "causal-lm" = summed next-token cross-entropy over pairs of unpadded positions (any "labels"
in a batch are ignored); "classification" = summed cross-entropy of the logits against batch["labels"].

Accuracy and cost: each batch's Gram is one matrix product in the activations' dtype (float32, or
float32 for half-precision models), added into the float64 total, so the float64 accumulation is
one addition per batch instead of a float64 product; the squared gradients are reduced in float32
and added into float64 vectors the same way. Without gradients the pass stops at the model's
backbone (`base_model`): no language-model head, no loss, no backward.

Memory is bounded by the Gram matrices (n^2 per input group) plus a few vectors per layer, whatever
the number of batches; activations live only for one batch. The model runs in eval mode (no dropout)
with gradients enabled only for the targeted weights; its training mode and requires_grad flags are
restored afterwards and all gradients are cleared. Statistics are accumulated on the model's device
and returned on the CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import UserInputError
from .methods.base import LayerStats
from .targets import Target, as_out_in, find_blocks, find_targets, get_module, weight_matrix

TASKS = ("causal-lm", "classification")
FORMAT = "lowrank-sweep/calibration"
VERSION = "1"


@dataclass(eq=False)
class CalibrationStats:
    """Statistics of one calibration pass; see the module docstring for the meaning of each field."""

    targets: list[Target]
    grams: dict[str, torch.Tensor]
    tokens: dict[str, int]
    row_fisher: dict[str, torch.Tensor]
    col_fisher: dict[str, torch.Tensor]
    neuron_fisher: dict[str, torch.Tensor]
    block_importance: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def has_gradients(self) -> bool:
        """Whether the Fisher statistics were collected (a pass with gradients)."""
        return bool(self.meta.get("gradients", True))

    def layer(self, name: str) -> LayerStats:
        """The statistics of target `name` (its Gram is shared with its input group; the Fisher
        vectors are None when the pass had no gradients)."""
        t = next((t for t in self.targets if t.name == name), None)
        if t is None:
            raise UserInputError(f"layer '{name}' has no calibration statistics; calibrated layers: "
                                 f"{', '.join(t.name for t in self.targets[:5])}, ...")
        return LayerStats(gram=self.grams.get(t.input_group), tokens=self.tokens[t.input_group],
                          row_fisher=self.row_fisher.get(name), col_fisher=self.col_fisher.get(name),
                          neuron_fisher=self.neuron_fisher.get(name))

    def check_matches(self, model: nn.Module) -> None:
        """UserInputError naming the first layer where `model` differs from what was calibrated."""
        where = f"calibration statistics ({self.meta.get('model_class', '?')}) vs model {type(model).__name__}"
        try:
            found = {t.name: t for t in find_targets(model, roles=sorted({t.role for t in self.targets}))}
        except UserInputError as e:
            raise UserInputError(f"{where}: {e}") from e
        mine = {t.name: t for t in self.targets}
        for t in self.targets:
            other = found.get(t.name)
            if other is None:
                raise UserInputError(f"{where}: the model has no {t.role} layer '{t.name}'")
            if other != t:
                raise UserInputError(
                    f"{where}: layer '{t.name}' is {_describe(t)} in the statistics but {_describe(other)} "
                    "in the model"
                )
        extra = [n for n in found if n not in mine]
        if extra:
            raise UserInputError(f"{where}: layer '{extra[0]}' of the model has no statistics")
        n_blocks = len(find_blocks(model))
        if n_blocks != len(self.block_importance):
            raise UserInputError(f"{where}: {len(self.block_importance)} blocks calibrated, model has {n_blocks}")

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A flat dict of contiguous tensors and a str -> str metadata dict (JSON values), ready for
        `safetensors.torch.save_file(tensors, path, metadata=metadata)`."""
        tensors = {f"gram/{g}": v.contiguous() for g, v in self.grams.items()}
        for kind in ("row_fisher", "col_fisher", "neuron_fisher"):
            tensors |= {f"{kind}/{n}": v.contiguous() for n, v in getattr(self, kind).items()}
        tensors["block_importance"] = self.block_importance.contiguous()
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "targets": json.dumps([asdict(t) for t in self.targets]),
            "tokens": json.dumps(self.tokens),
            "meta": json.dumps(self.meta),
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> CalibrationStats:
        """Inverse of `to_tensors`."""
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise UserInputError(f"calibration file: format {metadata.get('format')!r} version "
                                 f"{metadata.get('version')!r}; expected {FORMAT!r} version {VERSION!r}")
        targets = [Target(**d) for d in json.loads(metadata["targets"])]

        def get(key: str) -> torch.Tensor:
            if key not in tensors:
                raise UserInputError(f"calibration file is incomplete: tensor '{key}' is missing")
            return tensors[key]

        groups = dict.fromkeys(t.input_group for t in targets)
        meta = json.loads(metadata["meta"])
        fisher = targets if meta.get("gradients", True) else []
        weight_fisher = fisher if meta.get("weight_fisher", True) else []
        return cls(
            targets=targets,
            grams={g: get(f"gram/{g}") for g in groups},
            tokens={g: int(n) for g, n in json.loads(metadata["tokens"]).items()},
            row_fisher={t.name: get(f"row_fisher/{t.name}") for t in weight_fisher},
            col_fisher={t.name: get(f"col_fisher/{t.name}") for t in weight_fisher},
            neuron_fisher={t.name: get(f"neuron_fisher/{t.name}") for t in fisher},
            block_importance=get("block_importance"),
            meta=meta,
        )

    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        tensors, _ = self.to_tensors()
        return sum(v.numel() * v.element_size() for v in tensors.values())

    def to(self, device: torch.device | str) -> CalibrationStats:
        """A copy with every tensor on `device`."""

        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return CalibrationStats(list(self.targets), move(self.grams), dict(self.tokens), move(self.row_fisher),
                                move(self.col_fisher), move(self.neuron_fisher), self.block_importance.to(device),
                                dict(self.meta))


def _describe(t: Target) -> str:
    kind = "Conv1D" if t.transposed else "Linear"
    return f"role {t.role}, block {t.block}, [{t.out_features} x {t.in_features}] {kind}, input group {t.input_group}"


def estimate_stats_bytes(model: nn.Module, targets: list[Target] | None = None, gradients: bool = True,
                         weight_fisher: bool = True) -> int:
    """Bytes `collect_stats` will return, from shapes alone (float64 everywhere)."""
    targets = find_targets(model) if targets is None else targets
    grams = {t.input_group: t.in_features**2 for t in targets}
    per_target = (lambda t: 2 * t.out_features + t.in_features) if weight_fisher else (lambda t: t.out_features)
    vectors = sum(per_target(t) for t in targets) if gradients else 0
    return 8 * (sum(grams.values()) + vectors + len(find_blocks(model)))


@dataclass
class _Group:
    """Accumulator of one input group and the check that its members really share their input."""

    members: frozenset[str]
    gram: torch.Tensor
    tokens: int = 0
    current: torch.Tensor | None = None
    pending: set[str] = field(default_factory=set)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


class _Collector:
    """Hooks and accumulators of one calibration pass."""

    def __init__(self, model: nn.Module, targets: list[Target], blocks: list[nn.Module], device: torch.device,
                 gradients: bool, weight_fisher: bool):
        f64 = dict(dtype=torch.float64, device=device)
        self.gradients = gradients
        self.targets = targets
        self.groups: dict[str, _Group] = {}
        for t in targets:
            g = self.groups.setdefault(
                t.input_group, _Group(frozenset(), torch.zeros(t.in_features, t.in_features, **f64)))
            g.members |= {t.name}
        with_fisher = targets if gradients else []
        with_weight_fisher = with_fisher if weight_fisher else []
        self.row = {t.name: torch.zeros(t.out_features, **f64) for t in with_weight_fisher}
        self.col = {t.name: torch.zeros(t.in_features, **f64) for t in with_weight_fisher}
        self.neuron = {t.name: torch.zeros(t.out_features, **f64) for t in with_fisher}
        self.cos_sum = torch.zeros(len(blocks), **f64)
        self.cos_count = torch.zeros(len(blocks), **f64)
        self.mask = torch.ones(0, dtype=torch.bool)
        self.every_token = True  # no padding in the batch: rows need no masking (no copy)
        self.handles = []
        for t in targets:
            module = get_module(model, t.name)
            self.handles.append(module.register_forward_hook(self._target_hook(t)))
            if gradients and weight_fisher:
                self.handles.append(module.weight.register_post_accumulate_grad_hook(self._grad_hook(t)))
        for b, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._block_hook(b), with_kwargs=True))

    def rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The unpadded token rows of an activation [..., d] as [tokens, d]."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.mask.numel():
            raise RuntimeError(f"{name}: activation has {flat.shape[0]} token rows, the batch has {self.mask.numel()}")
        return flat if self.every_token else flat[self.mask]

    def _target_hook(self, t: Target):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            group = self.groups[t.input_group]
            if group.current is None or not _same_tensor(group.current, x):
                if group.pending:
                    raise RuntimeError(f"input group '{t.input_group}': {sorted(group.pending)} did not read the "
                                       f"same input as {t.name}; find_targets' grouping is wrong for this model")
                group.current, group.pending = x, set(group.members)
                with torch.no_grad():
                    rows = _at_least_float32(self.rows(x, t.name))
                    _add_upper_gram(group.gram, rows)
                    group.tokens += rows.shape[0]
            group.pending.discard(t.name)
            if self.gradients and output.requires_grad:
                acc, name = self.neuron[t.name], t.name

                def grad_hook(grad: torch.Tensor) -> None:
                    acc.add_(_at_least_float32(self.rows(grad, name)).square().sum(0).to(torch.float64))

                output.register_hook(grad_hook)

        return hook

    def _grad_hook(self, t: Target):
        def hook(param: nn.Parameter) -> None:
            sq = _at_least_float32(as_out_in(param.grad.detach(), t.transposed)).square()
            self.row[t.name].add_(sq.sum(1).to(torch.float64))
            self.col[t.name].add_(sq.sum(0).to(torch.float64))
            param.grad = None

        return hook

    def _block_hook(self, b: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            with torch.no_grad():
                cos = F.cosine_similarity(self.rows(h_in, f"block {b}").float(), self.rows(h_out, f"block {b}").float(),
                                          dim=-1)
                self.cos_sum[b] += cos.sum().to(torch.float64)
                self.cos_count[b] += cos.numel()

        return hook

    def begin(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.reshape(-1).bool()
        self.every_token = bool(self.mask.all())

    def end(self) -> None:
        for name, g in self.groups.items():
            if g.pending:
                raise RuntimeError(f"input group '{name}': {sorted(g.pending)} never read its input")
            g.current = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self, meta: dict) -> CalibrationStats:
        tokens = {name: g.tokens for name, g in self.groups.items()}
        by_target = {t.name: max(tokens[t.input_group], 1) for t in self.targets if t.name in self.neuron}
        stats = CalibrationStats(
            targets=list(self.targets),
            grams={name: _symmetric(g.gram) for name, g in self.groups.items()},
            tokens=tokens,
            row_fisher=self.row,
            col_fisher=self.col,
            neuron_fisher={n: v / by_target[n] for n, v in self.neuron.items()},
            block_importance=1.0 - self.cos_sum / self.cos_count.clamp(min=1),
            meta=meta,
        )
        return stats.to("cpu")


GRAM_BLOCK = 128  # columns per block row of the Gram product
IGNORE = -100  # label of a padded next-token pair (cross_entropy ignore_index)


def _add_upper_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """total[i, j] += sum over the rows of x_i x_j for every i <= j (float64 total), block row by
    block row: rows[:, i:i+w]^T rows[:, i:] for each block of w columns. A Gram is symmetric, so
    this skips the blocks below the diagonal: 54 % (d = 1536) to 62 % (d = 576) of the FLOPs of
    rows^T rows, torch having no symmetric rank-k product. `_symmetric` fills the rest at the end."""
    d = rows.shape[1]
    for i in range(0, d, GRAM_BLOCK):
        total[i:i + GRAM_BLOCK, i:].add_((rows[:, i:i + GRAM_BLOCK].T @ rows[:, i:]).to(torch.float64))


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The full Gram from the upper triangle that `_add_upper_gram` accumulated, filled in place
    block by block (each diagonal block from its upper triangle, the rest below it as the
    transpose of the block row to its right): exactly symmetric, and 5-8x faster than one
    transposed add of the whole matrix."""
    d = upper.shape[0]
    for i in range(0, d, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, d)
        block = upper[i:j, i:j]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
        upper[j:, i:j] = upper[i:j, j:].T
    return upper


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32 and float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


FISHERS = ("empirical", "sampled")


SAMPLE_ROWS = 256  # positions a chunk of `_sampled`: its softmax and cumulative sum stay in cache


def _sampled(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution softmax(logits) [..., classes], by
    inverting its cumulative sum at one uniform draw per position, `SAMPLE_ROWS` positions at a
    time (against `torch.multinomial`: 4.0 s -> 0.4 s for 2,040 positions over a 49k vocabulary;
    whole at once, a 262k vocabulary took twice as long as in chunks)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    labels = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for i in range(0, flat.shape[0], SAMPLE_ROWS):
        cdf = flat[i:i + SAMPLE_ROWS].float().softmax(-1).cumsum_(-1)
        u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
        labels[i:i + SAMPLE_ROWS] = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    return labels.reshape(logits.shape[:-1])


def _loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor, task: str,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Summed loss of a batch (see the module docstring); with a generator, against labels sampled
    from the model (the Monte Carlo Fisher) instead of the data's."""
    if task == "classification":
        if "labels" not in batch:
            raise UserInputError("calibration batches for task 'classification' need 'labels'")
        labels = batch["labels"] if generator is None else _sampled(logits, generator)
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    # The logits are used whole, position t against token t + 1, the last position and padded pairs
    # ignored through their labels: boolean-indexing the [batch, len, vocab] logits, or slicing off
    # their last position, would copy them and zero-fill a tensor of their size in the backward pass
    # (about 0.5 s a batch of 8 x 256 over a 49k vocabulary); the gradients are the same.
    following = batch["input_ids"][:, 1:] if generator is None else _sampled(logits[:, :-1], generator)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    labels[:, :-1] = following.masked_fill(~(mask[:, :-1] & mask[:, 1:]), IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def collect_stats(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str = "causal-lm",
                  targets: list[Target] | None = None, progress: bool = True,
                  gradients: bool = True, fisher: str = "empirical", fisher_samples: int = 1,
                  seed: int = 0, weight_fisher: bool = True) -> CalibrationStats:
    """One pass over `batches` (dicts with input_ids, attention_mask, and labels for classification).

    `fisher="sampled"`: the Fisher statistics from `fisher_samples` label draws per token from the
    model's own prediction (seeded by `seed`; an unbiased estimate of the Gauss-Newton curvature)
    instead of the data labels ("empirical"); each draw is one more backward pass.

    `targets` defaults to `find_targets(model)`. `gradients=False`: a forward pass through the
    backbone only, for methods that need no Fisher statistics (the Grams, token counts and block
    importance are the same). `weight_fisher=False`: no row and column weight Fisher, and so no
    weight gradients: the backward pass starts from the input embeddings' output and computes the
    activations' gradients only (the neuron Fisher is the same). Returns the statistics on the CPU.
    """
    if task not in TASKS:
        raise UserInputError(f"task {task!r}: allowed {', '.join(TASKS)}")
    if fisher not in FISHERS:
        raise UserInputError(f"calibration fisher {fisher!r}: allowed {', '.join(FISHERS)}")
    if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise UserInputError(f"calibration fisher_samples must be an integer >= 1, got {fisher_samples!r}")
    targets = find_targets(model) if targets is None else list(targets)
    if not targets:
        raise UserInputError("calibration targets: empty list")
    for t in targets:
        shape = tuple(weight_matrix(model, t).shape)
        if shape != (t.out_features, t.in_features):
            raise UserInputError(f"calibration target '{t.name}' is [{t.out_features} x {t.in_features}], "
                                 f"the model's layer is [{shape[0]} x {shape[1]}]")
    blocks = find_blocks(model)
    params = list(model.parameters())
    device = params[0].device
    was_training = model.training
    flags = [p.requires_grad for p in params]
    start = time.perf_counter()
    n_batches = n_sequences = seq_len = 0
    backbone = model if gradients else getattr(model, "base_model", model)
    collector = None
    handles = []
    generator = None
    if gradients and fisher == "sampled":
        generator = torch.Generator(device=device).manual_seed(seed)
    draws = fisher_samples if generator is not None else 1
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        if gradients and weight_fisher:
            for t in targets:
                get_module(model, t.name).weight.requires_grad_(True)
        elif gradients:  # the embeddings' output is the one leaf that needs a gradient
            handles.append(model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: output.requires_grad_()))
        collector = _Collector(model, targets, blocks, device, gradients, weight_fisher)  # after: it hooks the gradients
        with torch.set_grad_enabled(gradients):
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                batch = {k: v.to(device) for k, v in batch.items()}
                if "input_ids" not in batch:
                    raise UserInputError("calibration batches need 'input_ids'")
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                collector.begin(mask)
                output = backbone(**{k: v for k, v in batch.items() if k != "labels"})
                if gradients:
                    logits = getattr(output, "logits", None)
                    if logits is None:
                        raise UserInputError(f"model {type(model).__name__} returns no logits; calibration needs "
                                             "a model with a language-model or classification head")
                    for draw in range(draws):  # each draw's squares weigh 1 / draws
                        loss = _loss(logits, batch, mask, task, generator)
                        (loss / draws ** 0.5 if draws > 1 else loss).backward(retain_graph=draw < draws - 1)
                collector.end()
                n_batches += 1
                n_sequences += batch["input_ids"].shape[0]
                seq_len = max(seq_len, batch["input_ids"].shape[1])
    finally:
        for h in handles:
            h.remove()
        if collector is not None:
            collector.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_batches == 0:
        raise UserInputError("calibration batches: got none")
    meta = {
        "model_class": type(model).__name__,
        "n_params": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "task": task,
        "batches": n_batches,
        "sequences": n_sequences,
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - start, 3),
        "gradients": gradients,
        **({"fisher": fisher, "fisher_samples": draws} if generator is not None else {}),
        **({"weight_fisher": False} if gradients and not weight_fisher else {}),
        "device": str(device),
        "block_importance": "block influence: 1 - mean cos(h_in, h_out)",
    }
    return collector.result(meta)
