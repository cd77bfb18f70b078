"""What a method is and what its decompositions offer the rest of the library.

A method is a frozen dataclass (`MethodConfig`): its fields are its options (with defaults,
validated and coerced in `__post_init__`), its class variables say what it is:

    name        the name sweep files and the CLI use ("whiten-fd")
    needs       the `LayerStats` fields it reads ("gram", "neuron_fisher", ...)
    factorizes  what one of its units is: "matrix" (a linear layer, low-rank factors) or "mlp"
                (a whole MLP, neuron selection)
    allocations the allocations its units allow (None: all; `hybrid` needs "spectrum", the only
                one that chooses between alternative forms of a unit)

and its `decompose` turns one unit's weight and statistics into a `Factorization`: the
ratio-independent decomposition of that unit, which the allocation reads (`allocation_unit`, with
the loss curve) and the apply step applies at any rank (`apply`). `register` adds a method to the
registry that sweep files and `method_config` resolve names in; nothing else in the project
knows method names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compression.allocation import Unit
from compression.errors import UserInputError
from compression.targets import MlpGroup, Target, find_mlps, weight_matrix

if TYPE_CHECKING:
    from compression.methods.whitening import Whitening


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer y = W x + b, W [m, n].

    gram: G = sum over tokens of x x^T, [n, n] float64 (shared by layers reading the same input).
    tokens: number of tokens in G.
    row_fisher: [m] row sums of the empirical weight Fisher (sum_j F_ij).
    col_fisher: [n] column sums of the weight Fisher (sum_i F_ij).
    neuron_fisher: [m] g_i = mean over tokens of (dl/dy_i)^2.
    """

    gram: Tensor | None = None
    tokens: int = 0
    row_fisher: Tensor | None = None
    col_fisher: Tensor | None = None
    neuron_fisher: Tensor | None = None

    def to(self, device: torch.device | str) -> LayerStats:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return LayerStats(move(self.gram), self.tokens, move(self.row_fisher), move(self.col_fisher),
                          move(self.neuron_fisher))


STAT_FIELDS = ("gram", "row_fisher", "col_fisher", "neuron_fisher")
GRADIENT_STATS = ("row_fisher", "col_fisher", "neuron_fisher")  # need the backward pass
WEIGHT_FISHER_STATS = ("row_fisher", "col_fisher")  # need the weights' gradients too


@runtime_checkable
class Factorization(Protocol):
    """The ratio-independent decomposition of one unit (a matrix or an MLP) by one method.

    `unit` is the `Target` or `MlpGroup` it decomposes (None when made from a bare tensor, which
    then cannot be applied); `max_rank` the largest rank (kept neurons for an MLP);
    `loss_curve()[k]` the method's loss when keeping rank k."""

    method: str
    unit: Target | MlpGroup | None
    max_rank: int

    def loss_curve(self) -> Tensor: ...

    def allocation_unit(self) -> Unit:
        """The allocation's view of this unit: its parameter costs and loss curve."""
        ...

    def apply(self, model: nn.Module, k: int) -> None:
        """Replace the unit in `model` by its rank-k form, in place."""
        ...

    def to(self, device: torch.device | str) -> Factorization: ...

    def nbytes(self) -> int: ...


_REGISTRY: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method known by its `name` (a later class of the same name wins)."""
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig) and isinstance(getattr(cls, "name", None), str)):
        raise TypeError("register() takes a MethodConfig subclass with a class variable `name`")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[MethodConfig]]:
    """name -> config class of every known method (a copy)."""
    return dict(_REGISTRY)


def method_config(method: str | MethodConfig, **options) -> MethodConfig:
    """The config of `method` (a name, or a config that is returned with `options` applied).

    UserInputError for an unknown name or option, naming what is allowed."""
    if isinstance(method, MethodConfig):
        return dataclasses.replace(method, **options) if options else method
    cls = _REGISTRY.get(method) if isinstance(method, str) else None
    if cls is None:
        raise UserInputError(f"unknown method {method!r}; allowed: {', '.join(_REGISTRY)}")
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserInputError(f"method {method!r} has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(allowed) if allowed else 'none'}")
    return cls(**options)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config (see the module docstring)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    factorizes: ClassVar[str]
    allocations: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # options of type float accept ints and are stored as floats
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise UserInputError(f"method {self.name!r}: option {f.name} must be a finite number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
        self.validate()

    def validate(self) -> None:
        """Raise UserInputError for an option value the method cannot use (override)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def options(self) -> dict:
        """The options that differ from their defaults: configs with equal options are the same method."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    @property
    def key(self) -> str:
        """The method with its options as one string ("whiten-fd{}", "whiten-fd{"alpha":0.5}")."""
        return method_key(self.name, self.options())

    @property
    def needs_gradients(self) -> bool:
        """Whether the statistics this method reads need the calibration's backward pass."""
        return any(s in GRADIENT_STATS for s in self.needs)

    @property
    def needs_weight_fisher(self) -> bool:
        """Whether this method reads the weight Fisher (the weights' gradients in that pass)."""
        return any(s in WEIGHT_FISHER_STATS for s in self.needs)

    def to_dict(self) -> dict:
        """{"name": ..., "options": {...}}; `MethodConfig.from_dict` reads it back."""
        return {"name": self.name, "options": self.options()}

    @staticmethod
    def from_dict(d: dict) -> MethodConfig:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("options", {}), dict):
            raise UserInputError(f"method config {d!r} is malformed; expected {{'name': ..., 'options': {{...}}}}")
        return method_config(d["name"], **d.get("options", {}))

    # -- what a method decomposes, and how --------------------------------------------------------

    def units(self, model: nn.Module, stats) -> list[Target | MlpGroup]:
        """The units of `model` this method decomposes, in a fixed order."""
        raise NotImplementedError

    def derived_from(self) -> list[MethodConfig]:
        """The methods whose decompositions make this one's without decomposing again (`derive`,
        in this order): a sweep that uses several of them decomposes each once. None (the
        default): the method decomposes by itself."""
        return []

    def derive(self, decompositions: list[dict[str, Factorization]]) -> dict[str, Factorization]:
        """This method's decompositions from those of `derived_from()`, in its order: what
        `decompose_model` returns."""
        raise NotImplementedError

    def decompose_model(self, model: nn.Module, stats, device: torch.device, store_dtype: torch.dtype,
                        progress: bool = False, whitenings: dict | None = None) -> dict[str, Factorization]:
        """unit name -> Factorization of every unit (see `compression.apply.decompose_model`).
        `whitenings`: a cache of `Whitening`s to share between calls (methods) on the same stats."""
        raise NotImplementedError

    def check_stats(self, stats: LayerStats | None) -> LayerStats:
        stats = stats if stats is not None else LayerStats()
        for needed in self.needs:
            if getattr(stats, needed) is None:
                raise UserInputError(
                    f"method {self.name!r} needs the calibration statistic {needed!r}, which is missing for this "
                    f"layer; methods that need no statistics: "
                    f"{', '.join(n for n, c in _REGISTRY.items() if not c.needs) or 'none'}")
        return stats


@dataclass(frozen=True)
class MatrixMethod(MethodConfig):
    """A method that factorises every targeted matrix into low-rank factors."""

    factorizes: ClassVar[str] = "matrix"
    whitens: ClassVar[bool] = False  # uses S with S S^T = G: shared by the layers of one input group

    def in_form(self, factors: Factorization) -> Factorization:
        """A decomposition of `decompose` in the form the method stores its matrices in: two factors
        (this default), or, for a method with a `form` option, possibly an identity block
        (`methods.identity_block.in_form`)."""
        return factors

    def derived_from(self) -> list[MethodConfig]:
        """A method with a `form` other than two factors stores the same decomposition as its
        two-factor twin in another form (see `MethodConfig.derived_from`)."""
        if getattr(self, "form", "factors") == "factors":
            return []
        return [dataclasses.replace(self, form="factors")]

    def derive(self, decompositions: list[dict[str, Factorization]]) -> dict[str, Factorization]:
        return {name: self.in_form(dec) for name, dec in decompositions[0].items()}

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> Factorization:
        """The decomposition of one weight [out, in] (float, on any device; results stay there).
        `whitening`: a precomputed `Whitening` of stats.gram (whitening methods)."""
        raise NotImplementedError

    def whitening(self, gram: Tensor) -> Whitening:
        """The whitening of a Gram matrix for this method's options (whitening methods)."""
        raise NotImplementedError

    @property
    def whitening_key(self) -> tuple:
        """What a `Whitening` depends on besides the input (whitening methods: the clamp)."""
        raise NotImplementedError

    def units(self, model: nn.Module, stats) -> list[Target]:
        return list(stats.targets)

    def decompose_model(self, model: nn.Module, stats, device: torch.device, store_dtype: torch.dtype,
                        progress: bool = False, whitenings: dict | None = None) -> dict[str, Factorization]:
        whitenings = {} if whitenings is None else whitenings  # (input group, options, device) -> Whitening
        out = {}
        for target in tqdm(self.units(model, stats), desc=f"{self.name}: decompose", disable=not progress):
            layer_stats = stats.layer(target.name).to(device)
            weight = weight_matrix(model, target).detach().to(device)
            whitening = None
            if self.whitens:
                key = (target.input_group, self.whitening_key, str(device))
                if key not in whitenings:
                    whitenings[key] = self.whitening(layer_stats.gram)
                whitening = whitenings[key]
            out[target.name] = self.in_form(self.decompose(weight, layer_stats, unit=target, whitening=whitening,
                                                           store_dtype=store_dtype))
        return out


@dataclass(frozen=True)
class MlpMethod(MethodConfig):
    """A method that keeps some neurons of every MLP (a narrower dense MLP)."""

    factorizes: ClassVar[str] = "mlp"

    def decompose(self, down_weight: Tensor, stats: LayerStats | None = None, unit: MlpGroup | None = None,
                  store_dtype: torch.dtype = torch.float32) -> Factorization:
        """The decomposition of one MLP from its down weight [h, f] and the statistics of the down
        projection (stats.gram: the Gram of the intermediate activations)."""
        raise NotImplementedError

    def units(self, model: nn.Module, stats) -> list[MlpGroup]:
        """The MLPs of the model; every one of their layers must have statistics."""
        mlps = find_mlps(model)
        names = {t.name for t in stats.targets}
        missing = [n for g in mlps for n in (*g.inputs, g.down) if n not in names]
        if missing:
            raise UserInputError(f"method {self.name!r} needs calibration statistics for every MLP layer; missing: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return mlps

    def decompose_model(self, model: nn.Module, stats, device: torch.device, store_dtype: torch.dtype,
                        progress: bool = False, whitenings: dict | None = None) -> dict[str, Factorization]:
        by_name = {t.name: t for t in stats.targets}
        out = {}
        for mlp in tqdm(self.units(model, stats), desc=f"{self.name}: decompose", disable=not progress):
            down = weight_matrix(model, by_name[mlp.down]).detach().to(device)
            out[mlp.name] = self.decompose(down, stats.layer(mlp.down).to(device), unit=mlp, store_dtype=store_dtype)
        return out


def method_key(name: str, options: dict) -> str:
    """`MethodConfig.key` from a name and its non-default options (no registry needed)."""
    return f"{name}{json.dumps(options, sort_keys=True, separators=(',', ':'))}"


def bound_unit(dec: Factorization) -> Target | MlpGroup:
    """The unit a decomposition belongs to; UserInputError for one made from a bare tensor."""
    if dec.unit is None:
        raise UserInputError(f"this {dec.method!r} decomposition was made from a bare tensor: it belongs to no "
                             f"layer of a model; use compression.decompose_model")
    return dec.unit


def check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise UserInputError("weight must be a 2-D floating-point tensor [out_features, in_features]")
    if not bool(torch.isfinite(weight).all()):
        raise UserInputError("weight contains NaN or inf")


def check_rank(k: int, max_rank: int) -> int:
    """k as a Python int, or UserInputError if it is not an integer in [0, max_rank]."""
    try:
        value = operator.index(k)
    except TypeError:
        value = None
    if value is None or isinstance(k, bool) or not 0 <= value <= max_rank:
        raise UserInputError(f"rank {k!r} is not allowed: use an integer in [0, {max_rank}]")
    return value


def as_float64(t: Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A statistic as float64 on `device`, checked for shape and finiteness."""
    if tuple(t.shape) != shape:
        raise UserInputError(f"{name} has shape {tuple(t.shape)}, expected {shape} for this layer")
    t = t.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise UserInputError(f"{name} contains NaN or inf; recollect the calibration statistics")
    return t
