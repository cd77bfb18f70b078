"""What trains when a compressed model heals: the layers (`layers_to_train`), and how (`Healing`).

The layers are targeted layers of the dense architecture (`compression.targets.find_targets` of the
dense model: q/k/v/o and the MLP projections of every block), as the compressed model computes
them: the two factors of a low-rank layer, or the dense layer that remains (left dense by the plan,
or a pruned MLP's narrower layer), `compression.layers.linear_parts`. `train` chooses them:

- "compressed": the layers of the units the plan compressed;
- "all": every targeted layer (kind "full": every parameter of the model, embeddings and norms too);
- a list of roles, e.g. [q, v, down]: the targeted layers of those roles.

Kind "full" trains their parameters. Kind "lora" adds LoRA adapters (PEFT) to them, W + (alpha / r)
B A with A [r, in] and B [out, r] (B starts at 0, so training starts from the compressed model),
and trains only the adapters; `Healing.merge` folds them into the layers' weights, so the model
that is evaluated and exported is made of plain `LowRankLinear` / `nn.Linear` / `Conv1D` layers
again, with no adapter code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from compression.allocation import RankPlan
from compression.layers import linear_parts
from compression.targets import Target, get_module
from trainables.finetune import FinetuneConfig

LORA_ADAPTER = "default"  # PEFT's name of the one adapter


def _unit_of(layer: str, ranks: dict[str, int | None]) -> str | None:
    """The plan unit a targeted layer belongs to: itself (a matrix), or the MLP that holds it."""
    if layer in ranks:
        return layer
    return next((unit for unit in ranks if layer.startswith(unit + ".")), None)


def layers_to_train(model: nn.Module, targets: list[Target], plan: RankPlan, train: str | list[str]) -> list[str]:
    """Names of the plain linear layers of the compressed `model` that heal (see the module
    docstring); `targets` are the dense model's, `plan` the one `model` was compressed with."""
    chosen = []
    for target in targets:
        if train == "compressed":
            unit = _unit_of(target.name, plan.ranks)
            if unit is None or plan.ranks[unit] is None:
                continue
        elif train != "all" and target.role not in train:
            continue
        chosen += linear_parts(model, target.name)
    return chosen


@dataclass
class Healing:
    """A compressed model made ready to heal: `model` is the caller's model, with adapters added
    for kind "lora" and only the parameters that train requiring grad (train it with
    `trainables.finetune.finetune`). `layers`: the layers that heal; `params_trained`: the
    number of parameters that train (LoRA: the adapters')."""

    model: nn.Module
    kind: str
    layers: list[str]
    params_trained: int
    _trained: list[str] = field(default_factory=list, repr=False)  # kind "full": the parameters that train
    _peft: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def prepare(cls, model: nn.Module, targets: list[Target], plan: RankPlan, config: FinetuneConfig) -> Healing:
        layers = layers_to_train(model, targets, plan, config.train)
        peft_model = None
        if config.kind == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=layers, bias="none")
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                # PEFT switches to the [in, out] layout of GPT-2's Conv1D layers itself, with a warning
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
                torch.manual_seed(config.seed)  # the adapters' random init (A), without touching the caller's RNG
                peft_model = get_peft_model(model, lora)  # adds the adapters into `model`, freezes the rest
        elif config.train == "all":
            model.requires_grad_(True)
        else:
            model.requires_grad_(False)
            for name in layers:
                get_module(model, name).requires_grad_(True)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        return cls(model=model, kind=config.kind, layers=layers, params_trained=sum(params[n].numel() for n in trained),
                   _trained=trained if peft_model is None else [], _peft=peft_model)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights now, under the names of the model without adapters (LoRA: each
        adapted layer's weight with its adapter folded in), detached copies on the CPU: what a
        checkpoint keeps and `sweeps.export` loads into the rebuilt compressed model."""
        if self.kind != "lora":
            params = dict(self.model.named_parameters())
            return {n: params[n].detach().to("cpu").clone() for n in self._trained}
        out = {}
        with torch.no_grad():
            for name in self.layers:
                layer = get_module(self.model, name)
                if hasattr(layer, "get_delta_weight"):  # adapter not merged yet
                    weight = layer.get_base_layer().weight + layer.get_delta_weight(LORA_ADAPTER)
                else:
                    weight = layer.weight
                out[f"{name}.weight"] = weight.detach().to("cpu").clone()
        return out

    def merge(self) -> nn.Module:
        """Fold LoRA adapters into the weights (nothing to do for kind "full"); returns the model,
        made of plain layers again."""
        if self._peft is not None:
            self._peft.merge_and_unload()  # in place: `model` gets its plain layers back
            self._peft = None
        return self.model
