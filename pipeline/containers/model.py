"""A container as the collection knows it: what the runtime says, what Kubernetes' CRI labels
say, and the kernel ids (mount and network namespace, cgroup) records are matched by.

Field meanings follow upstream Inspektor Gadget's container collection
(``pkg/container-collection/containers.go``, ``pkg/types``), from which the record fields
``k8s.*`` and ``runtime.*`` are filled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

# Labels the CRI plugin puts on the containers it creates (kubelet's names).
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"
LABEL_CRI_KIND = "io.cri-containerd.kind"
"""``sandbox`` for a pod's sandbox (pause) container, ``container`` for the others."""
KIND_SANDBOX = "sandbox"
_NOT_POD_LABELS = (LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID, LABEL_CONTAINER_NAME)
_NOT_POD_LABEL_PREFIXES = ("io.cri-containerd.", "io.kubernetes.cri.")
RUNTIME_CONTAINERD = "containerd"
_EMPTY: Mapping[str, str] = MappingProxyType({})


def pod_labels(sandbox_labels: Mapping[str, str]) -> dict[str, str]:
    """A pod's own labels from its sandbox container's labels: the CRI plugin copies the pod's
    labels there beside its bookkeeping ones, which are left out (as upstream's CRI client
    filters them)."""
    return {k: v for k, v in sandbox_labels.items()
            if k not in _NOT_POD_LABELS and not k.startswith(_NOT_POD_LABEL_PREFIXES)}


@dataclass(frozen=True, slots=True)
class Container:
    """One container of the runtime.

    Args:
        id: the runtime's container id.
        name: the runtime's name for it (``runtime.containerName``): the CRI container name
            label when there is one, else the id, as upstream's containerd client names it.
        runtime: ``runtime.runtimeName``.
        image: image reference (``runtime.containerImageName``); empty for a container run
            from a root filesystem without an image.
        image_digest: the image's manifest digest (``runtime.containerImageDigest``).
        started_at: wall-clock ns of the task's start (``runtime.containerStartedAt``).
        pid: the task's init process in the initial pid namespace (``runtime.containerPid``);
            0 while the container has no task.
        mntns: its mount namespace inode (0: no task yet); records are matched by it.
        netns: its network namespace inode (0: no task yet).
        cgroup_path: the init process's cgroup (v2 path, or v1 on a host without one).
        cgroup_id: the v2 cgroup's id (its directory's inode), 0 without a v2 hierarchy.
        namespace, pod_name, k8s_container_name, pod_uid: from the CRI labels.
        pod_labels: the pod's labels (from its sandbox container).
        host_network: the container shares the host's network namespace.
        labels: the container's own runtime labels.
    """

    id: str
    name: str = ""
    runtime: str = RUNTIME_CONTAINERD
    image: str = ""
    image_digest: str = ""
    started_at: int = 0
    pid: int = 0
    mntns: int = 0
    netns: int = 0
    cgroup_path: str = ""
    cgroup_id: int = 0
    namespace: str = ""
    pod_name: str = ""
    k8s_container_name: str = ""
    pod_uid: str = ""
    pod_labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    host_network: bool = False
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_labels(cls, container_id: str, labels: Mapping[str, str], image: str = "",
                    runtime: str = RUNTIME_CONTAINERD) -> Container:
        """A container as its runtime metadata describes it, before it has a task."""
        return cls(
            id=container_id, name=labels.get(LABEL_CONTAINER_NAME) or container_id,
            runtime=runtime, image=image, namespace=labels.get(LABEL_POD_NAMESPACE, ""),
            pod_name=labels.get(LABEL_POD_NAME, ""),
            k8s_container_name=labels.get(LABEL_CONTAINER_NAME, ""),
            pod_uid=labels.get(LABEL_POD_UID, ""), labels=MappingProxyType(dict(labels)))

    @property
    def is_sandbox(self) -> bool:
        return self.labels.get(LABEL_CRI_KIND) == KIND_SANDBOX

    @property
    def pod_labels_text(self) -> str:
        """``k=v,k=v`` as upstream formats ``k8s.podLabels`` (sorted here, so stable)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.pod_labels.items()))

    def with_(self, **changes: object) -> Container:
        return replace(self, **changes)  # type: ignore[arg-type]
