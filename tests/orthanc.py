"""A real Orthanc (Debian package) on free loopback ports, for integration tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: the routing rule shipped in deploy/ is the one the tests run
ROUTE_LUA = (ROOT / "deploy" / "orthanc" / "route-to-preannot.lua").read_text()
VERDICTS_LUA = (ROOT / "deploy" / "orthanc" / "verdicts.lua").read_text()


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian package orthanc; `make test` installs it as root)"
    if not DICOMWEB_PLUGIN.is_file():
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


class Orthanc:
    """An Orthanc server with preannot declared as a modality and a Lua routing rule."""

    def __init__(self, workdir: Path, *, preannot_port: int, user: str = "preannot",
                 password: str = "orthanc-secret-123456", route: bool = True, verdicts: bool = False) -> None:
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        self.user, self.password = user, password
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "route.lua").write_text(ROUTE_LUA)
        (workdir / "verdicts.lua").write_text(VERDICTS_LUA)
        scripts = [str(workdir / "route.lua")] if route else []
        scripts += [str(workdir / "verdicts.lua")] if verdicts else []
        config = {
            "Name": "TEST-PACS", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {user: password}, "StableAge": 2, "HttpCompressionEnabled": False,
            "DicomModalities": {"preannot": ["PREANNOT", "127.0.0.1", preannot_port]},
            **({"LuaScripts": scripts} if scripts else {}), "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = (workdir / "orthanc.log").open("w")
        self.proc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/system", auth=(user, password), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")

    def client(self):  # type: ignore[no-untyped-def]
        from orthanc_api_client import OrthancApiClient

        return OrthancApiClient(self.url, user=self.user, pwd=self.password)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
