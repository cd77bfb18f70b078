"""Which statistics a sweep's calibration pass collects (what its methods read), under which cache
key, and which cached statistics of a pass that collected more it reuses."""

from __future__ import annotations

import pytest

from sweeps import prepare
from sweeps.spec import parse_spec


def spec_of(method: str, **calibration):
    return parse_spec({
        "name": "t", "model": "tiny:llama",
        "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 32, "eval_windows": 2},
        "calibration": {"samples": 4, "batch_size": 2, **calibration},
        "grid": {"method": [method], "ratio": [0.2], "allocation": ["spectrum"]},
    })


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path))
    return tmp_path / "calibration"


def test_each_sweep_keys_the_pass_its_methods_need():
    full, neuron, forward = prepare.calibration_keys(spec_of("fwsvd"))
    assert len({full, neuron, forward}) == 3
    for method, key in (("fwsvd", full), ("whiten-fw", full), ("whiten-fd", neuron), ("hybrid", neuron),
                        ("id-fd", neuron), ("whiten", forward), ("svd", forward), ("id", forward)):
        spec = spec_of(method)
        assert prepare.calibration_keys(spec) == [full, neuron, forward]  # the methods are not in the key
        assert prepare.calibration_key(spec) == key, method
    assert prepare.calibration_keys(spec_of("fwsvd", samples=8))[0] != full


def test_a_sweep_reuses_cached_statistics_that_hold_more(cache):
    full, neuron, forward = prepare.calibration_keys(spec_of("fwsvd"))
    assert prepare.cache_key(spec_of("whiten-fd")) == neuron  # nothing cached: its own
    cache.mkdir(parents=True)
    (cache / f"{full}.safetensors").touch()
    assert prepare.cache_key(spec_of("whiten-fd")) == full and prepare.cache_key(spec_of("svd")) == full
    (cache / f"{neuron}.safetensors").touch()
    assert prepare.cache_key(spec_of("whiten-fd")) == neuron  # its own when there is one
    (cache / f"{full}.safetensors").unlink()
    assert prepare.cache_key(spec_of("svd")) == neuron and prepare.cache_key(spec_of("fwsvd")) == full


def test_the_pass_collects_what_its_key_promises(cache):
    whiten_fd = prepare.stats_for(spec_of("whiten-fd"), progress=False)
    assert whiten_fd.calibration_key == prepare.calibration_keys(spec_of("whiten-fd"))[1]
    assert whiten_fd.stats.meta["weight_fisher"] is False and not whiten_fd.stats.row_fisher
    assert whiten_fd.stats.neuron_fisher

    fwsvd = prepare.stats_for(spec_of("fwsvd"), progress=False)
    assert fwsvd.stats.row_fisher and not fwsvd.calibration_cached
    name = next(iter(fwsvd.stats.neuron_fisher))
    assert (fwsvd.stats.neuron_fisher[name] == whiten_fd.stats.neuron_fisher[name]).all()

    (cache / f"{whiten_fd.calibration_key}.safetensors").unlink()
    again = prepare.stats_for(spec_of("whiten-fd"), progress=False)  # the full statistics serve it
    assert again.calibration_cached and again.calibration_key == fwsvd.calibration_key

    (cache / f"{fwsvd.calibration_key}.safetensors").write_bytes(b"damaged")
    redone = prepare.stats_for(spec_of("whiten-fd"), progress=False)  # computed again under that key: in full
    assert not redone.calibration_cached and redone.calibration_key == fwsvd.calibration_key
    assert redone.stats.row_fisher
