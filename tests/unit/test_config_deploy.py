"""The deployment files: the systemd unit passes ``systemd-analyze verify`` and the
Kubernetes manifest has what the daemon needs (privileges, host mounts, a valid config)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.loader import ConfigLoader

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "config" / "deploy"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections -> key -> values (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def test_systemd_unit_contents() -> None:
    unit = _unit((DEPLOY / "gadgetpipe.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"] == ["/usr/local/bin/gadgetpipe serve --config "
                                    "/etc/gadgetpipe/config.yaml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP reloads instances
    assert service["RuntimeDirectory"] == ["gadgetpipe"]  # /run/gadgetpipe for the socket
    assert service["StateDirectory"] == ["gadgetpipe"]  # /var/lib/gadgetpipe
    caps = service["CapabilityBoundingSet"][0].split()
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"} <= set(caps)
    assert service["LimitMEMLOCK"] == ["infinity"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: scripts/setup peers installs systemd")
    # verify checks that ExecStart's binary exists: point it at this checkout's entry point.
    exe = Path(sys.executable).with_name("gadgetpipe")
    if not exe.exists():
        pytest.fail("the gadgetpipe entry point is not installed next to the interpreter: "
                    "run scripts/setup base")
    text = (DEPLOY / "gadgetpipe.service").read_text()
    unit = tmp_path / "gadgetpipe.service"
    unit.write_text(text.replace("/usr/local/bin/gadgetpipe", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    # Complaints about units outside ours (a container's odd host) are not ours to fix.
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "gadgetpipe" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def _docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_daemonset_essentials() -> None:
    docs = _docs()
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ds = docs["DaemonSet"]
    ns = docs["Namespace"]["metadata"]["name"]
    assert ds["metadata"]["namespace"] == docs["ConfigMap"]["metadata"]["namespace"] == ns
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"] \
        .items()
    assert pod["hostPID"] is True
    [c] = pod["containers"]
    assert c["securityContext"]["privileged"] is True
    assert c["command"] + c["args"] == ["gadgetpipe", "serve", "--config",
                                        "/etc/gadgetpipe/config.yaml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/fs/bpf", "/lib/modules", "/usr/src"):
        assert path in mounts, path
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts["/sys/fs/bpf"].get("mountPropagation") == "Bidirectional"
    config = volumes[mounts["/etc/gadgetpipe"]["name"]]
    assert config["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    state = volumes[mounts["/var/lib/gadgetpipe"]["name"]]
    assert state["hostPath"]["path"] == "/var/lib/gadgetpipe"  # instances survive pod restarts


def test_daemonset_config_is_valid() -> None:
    text = _docs()["ConfigMap"]["data"]["config.yaml"]
    loaded = ConfigLoader().load_text(text, "configmap:config.yaml")
    assert loaded.daemon is not None
    assert loaded.daemon.metrics_listen == "0.0.0.0:2224"
    pod = _docs()["DaemonSet"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "2224"
    assert [d.name for d in loaded.instances] == ["exec-audit"]
