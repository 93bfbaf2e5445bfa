"""A real container runtime: Debian's containerd in a scratch dir, running busybox containers
from a local root filesystem with Kubernetes' CRI labels (no image registry).

``ctr -a SOCK -n k8s.io run --label io.kubernetes.pod.name=... --rootfs ROOTFS ID CMD`` is
how containers start, as the CRI plugin would label them. Container ids carry a random prefix:
runc keeps its state per containerd namespace in /run/containerd/runc/<namespace>/<id>, shared
by every containerd on the machine.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.peers import PeerProcess, PeerStartError, require_executable

__all__ = ["BusyboxContainer", "Containerd"]

NAMESPACE = "k8s.io"
APPLETS = ("sh", "sleep", "cat", "true", "echo", "ls", "nslookup", "wget", "touch", "kill")


def _has_interpreter(path: str) -> bool:
    """Whether an ELF64 executable asks for a dynamic loader (a PT_INTERP program header)."""
    with open(path, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def build_rootfs(root: Path) -> Path:
    """A root filesystem: busybox-static and links named after the applets the tests run."""
    busybox = require_executable("busybox", "busybox (apt-get install -y busybox-static)")
    if _has_interpreter(busybox):
        raise PeerStartError(f"{busybox} is dynamically linked; the container root filesystem "
                             "needs busybox-static (apt-get install -y busybox-static)")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    return root


@dataclass(frozen=True)
class BusyboxContainer:
    """A container the fixture started: its id, labels, and the init process's pid."""

    id: str
    pid: int
    labels: Mapping[str, str]


class Containerd(PeerProcess):
    """containerd with root, state and its sockets in the peer's temp dir.

    ``socket`` is its gRPC socket; ``rootfs`` the busybox root filesystem every container
    shares (each still gets its own mount namespace). ``stop()`` removes every container it
    started before stopping containerd, so no shim or runc state outlives the test.
    """

    kind = "containerd"

    def __init__(self, *, start_timeout: float = 30.0, stop_timeout: float = 15.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self._containerd = require_executable("containerd", "containerd (apt-get install -y "
                                              "containerd runc)")
        self._ctr = require_executable("ctr", "ctr (apt-get install -y containerd)")
        require_executable("runc", "runc (apt-get install -y runc)")
        self.socket = self.workdir / "containerd.sock"
        self.rootfs = self.workdir / "rootfs"
        self.config_path = self.workdir / "config.toml"
        self.prefix = f"gp{uuid.uuid4().hex[:8]}"
        self._started: list[str] = []

    def _prepare(self) -> None:
        build_rootfs(self.rootfs)
        w = self.workdir
        # The CRI plugin is not needed (containers are labelled as it would label them) and
        # would want a CNI set-up.
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{w}/root"\n'
            f'state = "{w}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
            "[plugins]\n"
            '  [plugins."io.containerd.internal.v1.opt"]\n'
            f'    path = "{w}/opt"\n')

    def _command(self) -> Sequence[str]:
        return [self._containerd, "--config", str(self.config_path)]

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        return subprocess.run([self._ctr, "-a", str(self.socket), "version"],
                              capture_output=True).returncode == 0

    # --- containers -----------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 60.0,
            ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self._ctr, "-a", str(self.socket), "-n", NAMESPACE, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def new_id(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def run(self, name: str, argv: Sequence[str], *, pod: str = "", namespace: str = "",
            container: str = "", pod_uid: str = "", labels: Mapping[str, str] | None = None,
            sandbox: bool = False) -> BusyboxContainer:
        """Starts container ``new_id(name)`` detached, running ``argv``, with the CRI labels
        given; returns once its task runs."""
        all_labels = dict(labels or {})
        for key, value in (("io.kubernetes.pod.name", pod),
                           ("io.kubernetes.pod.namespace", namespace),
                           ("io.kubernetes.container.name", container),
                           ("io.kubernetes.pod.uid", pod_uid)):
            if value:
                all_labels[key] = value
        if sandbox:
            all_labels["io.cri-containerd.kind"] = "sandbox"
        cid = self.new_id(name)
        args = ["run", "-d"]
        for k, v in all_labels.items():
            args += ["--label", f"{k}={v}"]
        self._started.append(cid)
        self.ctr(*args, "--rootfs", str(self.rootfs), cid, *argv)
        return BusyboxContainer(cid, self.task_pid(cid), all_labels)

    def task_pid(self, cid: str) -> int:
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid:
                return int(parts[1])
        raise RuntimeError(f"container {cid} has no task")

    def exec(self, cid: str, argv: Sequence[str], timeout: float = 60.0,
             ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside container ``cid`` and waits for it."""
        return self.ctr("task", "exec", "--exec-id", f"x{uuid.uuid4().hex[:10]}", cid, *argv,
                        check=False, timeout=timeout)

    def remove(self, cid: str) -> None:
        """Kills the container's task and deletes it (no error when it is gone already)."""
        self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        self.ctr("task", "rm", "-f", cid, check=False)
        self.ctr("container", "rm", cid, check=False)
        if cid in self._started:
            self._started.remove(cid)

    def stop(self, keep_data: bool = False) -> None:
        if self.running:
            for cid in list(self._started):
                self.remove(cid)
        super().stop(keep_data)

    @staticmethod
    def netns_of(pid: int) -> int:
        return os.stat(f"/proc/{pid}/ns/net").st_ino

    @staticmethod
    def mntns_of(pid: int) -> int:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
