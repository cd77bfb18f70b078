"""cluster.yaml passes Ray's own cluster-launcher checks (offline: no cloud call)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def checked(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in the provider's defaults, then
    validate against the autoscaler schema (ray-schema.json) and its consistency rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_a_valid_ray_cluster_config(config):
    prepared = checked(config)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    workers = [v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no trials on the head
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["resources"]["GPU"] >= 1
    assert workers[0]["max_workers"] <= prepared["max_workers"]


def test_dashboard_on_localhost_and_torch_installed_first(config):
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = config[key]
        assert "torch==2.13.0" in commands[0]
        assert any("lowrank-sweep/constraints.txt" in c for c in commands[1:])
    assert "download.pytorch.org/whl/cpu" in config["head_setup_commands"][0]  # CPU head: no CUDA wheels


def test_no_credentials_in_the_file():
    text = CLUSTER.read_text().lower()
    for word in ("aws_access_key", "aws_secret", "secret_access", "ssh_private_key", "keyname", "hf_token:"):
        assert word not in text


@pytest.mark.parametrize("where", ["top", "node_type"])
def test_a_bogus_key_fails(config, where):
    bad = copy.deepcopy(config)
    if where == "top":
        bad["bogus_key"] = 1
    else:
        bad["available_node_types"]["gpu_worker"]["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        checked(bad)


def test_a_bad_head_node_type_fails(config):
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        checked(bad)
