"""ray_cluster.yaml: accepted by Ray's own cluster-launcher validation, and shaped for this project.

Ray's checks run offline: ``prepare_config`` (merges ray/autoscaler/aws/defaults.yaml, a packaged file) and
``validate_config`` (ray-schema.json plus the node-type rules) need no AWS access. The steps of ``ray up`` that
call AWS (instance-type lookup, key pair, subnets, security group) run against moto's in-process mock, with fake
credentials and a temporary HOME, so nothing leaves the machine.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
import yaml
from moto import mock_aws
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
COMMAND_KEYS = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"]
PLACEHOLDERS = ["ami-0123456789abcdef0", "123456789012", "your-bucket", "us-west-2"]


def load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as `ray up` sees it before contacting AWS: defaults merged, setup commands merged."""
    return prepare_config(copy.deepcopy(load() if raw is None else raw))


def head_type(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def setup_for(cfg: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands a node of ``node_type`` runs (a node type's own list replaces the global ones)."""
    if node_type == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    return cfg["available_node_types"][node_type].get("worker_setup_commands", cfg["worker_setup_commands"])


@pytest.fixture
def fake_aws(tmp_path, monkeypatch):
    """moto's AWS in this process; `ray up`'s key pair goes to a temporary HOME, never to ~/.ssh."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", load()["provider"]["region"])
    with mock_aws():
        yield tmp_path


# ----- Ray's validation ----------------------------------------------------------------------------------------


def test_ray_validates_the_cluster_file():
    raw = load()
    cfg = prepared(raw)
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["auth"]["ssh_user"] == "ubuntu"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert 0 < cfg["idle_timeout_minutes"] <= 60


def test_defaults_do_not_replace_the_project_commands():
    """prepare_config merges aws/defaults.yaml shallowly: a command list left out would be Ray's (which installs a
    nightly Ray wheel), so every list is set here and survives the merge unchanged."""
    raw, cfg = load(), prepared()
    for key in COMMAND_KEYS:
        assert key in raw, f"{key} missing: Ray's default would be used"
    assert cfg["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert cfg["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    assert cfg["head_start_ray_commands"] == raw["head_start_ray_commands"]
    commands = " ".join(c for key in COMMAND_KEYS for c in cfg[key])
    assert "ray-wheels" not in commands and "tensorflow" not in commands


def _unknown_top_level_key(cfg):
    cfg["max_worker"] = 4


def _wrong_type(cfg):
    cfg["idle_timeout_minutes"] = "ten"


def _fractional_gpu_resource(cfg):
    next(iter(worker_types(cfg).values()))["resources"]["GPU"] = 0.5


def _unknown_node_type_key(cfg):
    next(iter(worker_types(cfg).values()))["min_worker"] = 0


def _commands_not_a_list(cfg):
    cfg["worker_start_ray_commands"] = "ray start --address=$RAY_HEAD_IP:6379"


def _head_type_missing(cfg):
    cfg["head_node_type"] = "no_such_type"


def _min_workers_above_max(cfg):
    for t in worker_types(cfg).values():
        t["min_workers"] = cfg["max_workers"]


@pytest.mark.parametrize(("breakage", "error"), [
    (_unknown_top_level_key, jsonschema.ValidationError),
    (_wrong_type, jsonschema.ValidationError),
    (_fractional_gpu_resource, jsonschema.ValidationError),
    (_unknown_node_type_key, jsonschema.ValidationError),
    (_commands_not_a_list, jsonschema.ValidationError),
    (_head_type_missing, ValueError),
    (_min_workers_above_max, ValueError),
])
def test_ray_validation_rejects_a_broken_copy(breakage, error):
    """The same validation fails on a copy of the file with one mistake, so the positive test can fail."""
    raw = load()
    breakage(raw)
    with pytest.raises(error):
        validate_config(prepared(raw))


def test_declared_resources_match_the_aws_instance_types(fake_aws):
    """`ray up` fills missing resources from EC2's instance-type catalogue; the declared ones must agree with it
    (CPU and GPU counts of each worker instance type; the head may advertise fewer CPUs than it has)."""
    raw = load()
    blank = copy.deepcopy(raw)
    for node_type in blank["available_node_types"].values():
        node_type["resources"] = {}
    detected = AWSNodeProvider.fillout_available_node_types_resources(blank)["available_node_types"]
    for name, node_type in worker_types(raw).items():
        for resource in ("CPU", "GPU"):
            assert node_type["resources"][resource] == detected[name]["resources"][resource], (name, resource)
    head = raw["head_node_type"]
    assert 0 < head_type(raw)["resources"]["CPU"] <= detected[head]["resources"]["CPU"]
    assert "GPU" not in detected[head]["resources"], "the head is meant to be a CPU instance"


def test_ray_up_bootstrap_runs_against_mocked_aws(fake_aws):
    """The whole config path of `ray up` (prepare, resource fill-out, validate, AWS bootstrap: key pair, subnets,
    security group) succeeds, and the security group it creates opens only SSH to the outside, so the dashboard
    and the MLflow port on the head are reachable only from the cluster's nodes and through SSH tunnels."""
    cfg = _bootstrap_config(load(), no_config_cache=True)
    assert (fake_aws / ".ssh").is_dir()
    groups = {g for t in cfg["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    ec2 = boto3.client("ec2", region_name=cfg["provider"]["region"])
    described = ec2.describe_security_groups(GroupIds=sorted(groups))["SecurityGroups"]
    assert described
    outside = [rule for group in described for rule in group["IpPermissions"] if rule.get("IpRanges")]
    assert outside, "no ingress rule from outside the cluster: the check below would pass on nothing"
    for rule in outside:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule


# ----- the project's shape --------------------------------------------------------------------------------------


def test_head_is_a_cpu_node_and_gpu_workers_scale_from_zero():
    cfg = prepared()
    assert "GPU" not in head_type(cfg)["resources"] and head_type(cfg)["max_workers"] == 0
    gpu_types = worker_types(cfg)
    assert len(gpu_types) >= 2
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["resources"].get("GPU", 0) >= 1, name
        # The README's job (--workers 8 --gpus-per-worker 1) takes 9 GPUs: 8 Train workers + the clustering actor.
        assert min(node_type["max_workers"], cfg["max_workers"]) * node_type["resources"]["GPU"] >= 9, name


def test_one_gpu_worker_type_is_spot_and_one_on_demand():
    market = {name: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
              for name, t in worker_types(prepared()).items()}
    assert "spot" in market.values() and "on-demand" in market.values(), market
    assert load()["provider"]["cache_stopped_nodes"] is False  # spot instances cannot be stopped


def test_start_commands_bind_the_dashboard_to_localhost_and_join_the_head():
    cfg = prepared()
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    assert head[0] == "ray stop" and workers[0] == "ray stop"
    (start,) = [c for c in head if "ray start" in c]
    assert "--head" in start and "--port=6379" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", start), start
    assert "0.0.0.0" not in start
    (join,) = [c for c in workers if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in join


def test_the_working_directory_is_mounted_without_venv_runs_and_git():
    cfg = load()
    remote = [dst for dst, src in cfg["file_mounts"].items() if src == "."]
    assert remote == ["~/autossvh"], cfg["file_mounts"]
    excluded = {pattern.strip("/").removeprefix("**/") for pattern in cfg["rsync_exclude"]}
    assert {".venv", "runs", ".git"} <= excluded, cfg["rsync_exclude"]


def test_setup_installs_the_project_with_the_gpu_extra_on_workers_and_cpu_extra_on_head():
    cfg = prepared()
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("torch=="))
    common = " ".join(cfg["setup_commands"])
    assert "python3.11 -m venv" in common and "bin/activate" in common
    for name in cfg["available_node_types"]:
        commands = setup_for(cfg, name)
        text = " ".join(commands)
        installs = [c for c in commands if re.search(r"pip install .*-e \"?\.\[", c)]
        assert len(installs) == 1, (name, commands)
        assert installs[0].startswith("cd ~/autossvh && "), installs[0]
        extra = "cpu" if name == cfg["head_node_type"] else "gpu"
        other = "gpu" if extra == "cpu" else "cpu"
        assert f'".[{extra}]"' in installs[0], (name, installs[0])
        # faiss-cpu and faiss-gpu install the same module: never both on one node
        assert f".[{other}]" not in text and f"faiss-{other}" not in text, name
        assert f'"{pin}"' in text, (name, pin)
        assert "python3.11 -m venv" in text, name


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _item_start(lines: list[str], i: int) -> int:
    """The line that starts the YAML value of line ``i``: the ``- >-`` line for a line of a block scalar."""
    for j in range(i - 1, -1, -1):
        if lines[j].strip() and not _is_comment(lines[j]) and _indent(lines[j]) < _indent(lines[i]):
            return j if re.search(r"[>|][+-]?\s*$", lines[j]) else i
    return i


def _replace_marked(lines: list[str], i: int) -> bool:
    if "# REPLACE:" in lines[i]:
        return True
    j = _item_start(lines, i) - 1
    while j >= 0 and _is_comment(lines[j]):
        if "REPLACE:" in lines[j]:
            return True
        j -= 1
    return False


def test_every_placeholder_is_marked_replace():
    """Each line with a value the user must change carries `# REPLACE:`, or the comment right above it does."""
    lines = CLUSTER_YAML.read_text().splitlines()
    found = [i for i, line in enumerate(lines) if not _is_comment(line) and any(p in line for p in PLACEHOLDERS)]
    assert len(found) >= 6  # region, 3 AMIs, 3 instance profiles, the MLflow bucket
    unmarked = [f"{i + 1}: {lines[i]}" for i in found if not _replace_marked(lines, i)]
    assert not unmarked, "placeholders without a REPLACE marker:\n" + "\n".join(unmarked)
