"""deploy/: the compose file, the example configurations, the systemd unit and the Dockerfile agree
with each other and with the code (checked by parsing: no Docker engine on CI machines)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from node.config import load_config
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def test_compose_file_is_consistent() -> None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"orthanc", "preannot"}
    orthanc_cfg = json.loads(services["orthanc"]["environment"]["ORTHANC_JSON"])
    node_cfg_src = next(v.split(":")[0] for v in services["preannot"]["volumes"] if v.endswith("node.toml:ro"))
    node_cfg = load_config(DEPLOY / node_cfg_src, env={}, overrides={"models": {"dir": str(ROOT / "models")}})
    # Orthanc knows preannot under the node's AE title and port, on the preannot service
    ae, host, port = orthanc_cfg["DicomModalities"]["preannot"]
    assert (ae, host, port) == (node_cfg.node.ae_title, "preannot", node_cfg.node.port)
    # preannot accepts Orthanc and sends back to it
    assert orthanc_cfg["DicomAet"] in node_cfg.node.allowed_callers
    dest = node_cfg.destination(node_cfg.routes[0].send_to[0])
    assert (dest.ae_title, dest.host, dest.port) == (orthanc_cfg["DicomAet"], "orthanc", 4242)
    # the Lua rule is mounted and routes to that modality
    lua_src = next(v.split(":")[0] for v in services["orthanc"]["volumes"] if v.endswith(".lua:ro"))
    lua = (DEPLOY / lua_src).read_text()
    assert "OnStableSeries" in lua and "/modalities/preannot/store" in lua
    assert f"{node_cfg.node.port}:{node_cfg.node.port}" in services["preannot"]["ports"]
    assert services["preannot"]["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("name", ["preannot-orthanc.toml", "preannot-generic-pacs.toml"])
def test_example_configs_are_valid(name: str) -> None:
    cfg = load_config(DEPLOY / name, env={})
    assert cfg.routes and cfg.destinations
    assert all(m == "lesion-ct-demo" for r in cfg.routes for m in r.models)


def test_dockerfile_copies_what_exists_and_unit_runs_serve() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    for line in docker.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert 'CMD ["serve"]' in docker
    unit = (DEPLOY / "systemd" / "preannot.service").read_text()
    assert "ExecStart=/opt/preannot/.venv/bin/preannot serve" in unit and "Restart=on-failure" in unit
