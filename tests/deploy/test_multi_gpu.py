"""The multi-GPU worker examples: deploy/compose.multi-gpu.yaml (a compose override) and
deploy/k8s-multi-gpu (a kustomize overlay of deploy/k8s), validated and applied the way compose and
kustomize apply them, then checked against the CLI and each other."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from testkit.paths import ROOT

OVERRIDE = ROOT / "deploy" / "compose.multi-gpu.yaml"
OVERLAY = ROOT / "deploy" / "k8s-multi-gpu"
BIN = Path(sys.executable).parent


def _devices(args: list[str]) -> list[str]:
    return args[args.index("--devices") + 1].split(",")


def _parse(args: list[str]):
    from strokes.service.cli.main import build_parser

    return build_parser().parse_args(args)


def _merge(base, patch):
    """A strategic merge as kustomize does it for these fields: maps merge, `containers` and
    `volumeMounts` / `volumes` lists merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            same = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if same:
                out[same[0]] = _merge(out[same[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def test_compose_override_is_valid_and_its_worker_sees_as_many_gpus_as_it_drives():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(OVERRIDE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    base = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["worker"]
    worker = yaml.safe_load(OVERRIDE.read_text())["services"]["worker"]
    args = worker["command"]
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert _devices(args) == [f"cuda:{i}" for i in range(len(gpus["device_ids"]))]
    assert _parse(args).devices == "cuda:0,cuda:1,cuda:2"
    # Everything but the devices is the single-GPU worker's command.
    single = base["command"]
    assert args[: args.index("--devices")] == single[: single.index("--device")]
    assert args[args.index("--devices") + 2 :] == single[single.index("--device") + 2 :]


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_kustomize_overlay_gives_a_valid_worker_with_three_gpus(version):
    import kubernetes_validate

    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((OVERLAY / patch_ref["path"]).read_text())
    target = patch_ref["target"]
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "worker.yaml").read_text()) if d]
    (base,) = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
    worker = _merge(base, patch)
    kubernetes_validate.validate(worker, version, strict=True)

    (container,) = worker["spec"]["template"]["spec"]["containers"]
    devices = _devices(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == len(devices) == 3
    assert devices == [f"cuda:{i}" for i in range(len(devices))]
    _parse(container["args"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/models/BAGEL-7B-MoT" in mounts and mounts["/models/BAGEL-7B-MoT"]["readOnly"]
    assert "/dev/shm" in mounts  # NCCL's shared memory
    compose = yaml.safe_load(OVERRIDE.read_text())["services"]["worker"]["command"]
    assert container["args"] == compose
