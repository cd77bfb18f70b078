"""A method in one file: a toy method registered inside this test goes through the registry, the
sweep file's option check, plan, compress, save, load and a tiny Ray Tune sweep, with no other
file of the project knowing it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import ray.cloudpickle
import torch
from tiny_models import tiny_batches, tiny_model

import sweeps.runner as runner
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.io import load_compressed, save_compressed
from compression.methods import MatrixMethod, MethodConfig, method_config, register, weighted_svd
from compression.methods import base as methods_base
from sweeps.spec import parse_spec
from test_sweep_e2e import corpus, env, ray_cluster, sweep  # noqa: F401 - the same fixtures


@dataclass(frozen=True)
class ColumnNormSvd(MatrixMethod):
    """Toy: the SVD of W diag(||W[:, j]||^power) (power 0 is plain `svd`); needs no statistics."""

    name: ClassVar[str] = "toy-colnorm"
    needs: ClassVar[tuple[str, ...]] = ()
    power: float = 1.0

    def validate(self) -> None:
        if self.power < 0:
            raise UserInputError(f"method {self.name!r}: option power must be >= 0, got {self.power}")

    def decompose(self, weight, stats=None, unit=None, whitening=None, store_dtype=torch.float32):
        scale = weight.double().norm(dim=0).clamp(min=1e-12) ** self.power
        return weighted_svd(weight, right=scale, method=self.name, store_dtype=store_dtype, unit=unit)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(ColumnNormSvd)
    # a method defined outside the package travels to Ray's workers by value, as from a notebook
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    yield
    methods_base._REGISTRY.pop(ColumnNormSvd.name)
    ray.cloudpickle.unregister_pickle_by_value(__import__(__name__))


def test_the_config_is_validated_printable_and_round_trips():
    config = method_config("toy-colnorm", power=2)
    assert config == ColumnNormSvd(power=2.0) and isinstance(config.power, float)
    assert repr(config) == "ColumnNormSvd(power=2.0)" and config.key == 'toy-colnorm{"power":2.0}'
    assert MethodConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert method_config("toy-colnorm", power=1.0).options() == {}  # the default: the same method as none
    with pytest.raises(UserInputError, match=r"method 'toy-colnorm' has no option 'alpha'; its options: power"):
        method_config("toy-colnorm", alpha=1.0)
    with pytest.raises(UserInputError, match="power must be >= 0"):
        method_config("toy-colnorm", power=-1)


def test_plan_compress_save_and_load(tmp_path):
    model = tiny_model("llama")
    batches = tiny_batches(model)
    stats = collect_stats(model, batches, progress=False)
    decs = decompose_model(model, stats, "toy-colnorm", power=0.5)
    assert {d.method for d in decs.values()} == {"toy-colnorm"}
    for allocation in ("uniform", "spectrum"):
        plan = plan_ranks(model, stats, "toy-colnorm", 0.3, allocation, decs)
        assert abs(plan.achieved_ratio - 0.3) <= 0.01 and plan.method == "toy-colnorm"
    small = compress(copy.deepcopy(model), stats, "toy-colnorm", plan, decs)
    save_compressed(small, tmp_path / "toy", plan=plan)
    again, _, info = load_compressed(tmp_path / "toy")
    assert info["method"] == "toy-colnorm"
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, again(input_ids=ids).logits)
    # closed form: power 0 weights nothing, so its factors are plain svd's
    plain = decompose_model(model, stats, "toy-colnorm", power=0.0, store_dtype=torch.float64)
    svd = decompose_model(model, stats, "svd", store_dtype=torch.float64)
    for name, dec in plain.items():
        a, b = dec.truncate(5, torch.float64)
        a0, b0 = svd[name].truncate(5, torch.float64)
        torch.testing.assert_close(a @ b, a0 @ b0, rtol=1e-9, atol=1e-9)


def test_the_sweep_file_checks_its_options():
    base = {"name": "t", "model": "tiny:llama", "task": {"type": "causal-lm", "eval": "packaged:lee"}}
    spec = parse_spec(base | {"grid": {"method": ["toy-colnorm"], "ratio": [0.3], "options": {"power": [0.5, 1.0]}}})
    assert len(spec.grid[0].method_configs()) == 2
    with pytest.raises(UserInputError, match=r"grid\[0\].*'toy-colnorm' has no option 'alpha'; its options: power"):
        parse_spec(base | {"grid": {"method": ["toy-colnorm"], "ratio": [0.3], "options": {"alpha": [0.5]}}})


def test_a_tiny_sweep_runs_the_toy_method(ray_cluster, corpus, env):  # noqa: F811
    spec = sweep(corpus, env / "results", "toy", finetune={"steps": 0},
                 grid={"method": ["toy-colnorm", "svd"], "ratio": [0.3], "allocation": ["uniform", "spectrum"]})
    df = runner.run_sweep(spec).table
    toy = df[df["method"] == "toy-colnorm"]
    assert len(toy) == 2 and set(toy["status"]) == {"ok"}, df[["method", "status", "error"]]
    assert (abs(toy["achieved_ratio"] - 0.3) <= 0.01).all()
    assert all(json.loads(plan)["method"] == "toy-colnorm" for plan in toy["rank_plan"])
