"""Container selection: upstream's params, their values, and which containers they match.

Param names, keys, aliases and matching are upstream Inspektor Gadget's
(``pkg/operators/common/container-selector.go``, ``pkg/container-collection/match.go``). A
daemon announces its LocalManager's: ``operator.LocalManager.containername`` (alternative
``runtime-containername``), ``k8s-podname``, ``k8s-namespace``, ``k8s-containername``,
``k8s-selector``, ``runtime-containerimage-digest``, ``runtime-containerimage-id`` and
``host``. Clients written for Kubernetes send KubeManager's (``operator.KubeManager.podname``,
``namespace``, ``containername``, ``selector``, or their ``k8s-`` alternatives); those are
accepted too and mean the same: they are the LocalManager params' old keys (accepted, never
announced: announced, they would be gadgetctl flags twice).

Each value is a comma-separated list; ``!x`` excludes ``x``; a container matches when every
given list matches. ``k8s-selector`` is ``key=value`` pairs (``!key=value`` excludes).

Selection applies when any of these is given and ``host`` is false: then only matching
containers' records are emitted and host processes are left out. Without a selection every
process is traced, as before. ``host=true`` turns selection off, as upstream's ``--host``
(which reads "data from both the host and containers").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.containers.model import Container
from pipeline.params import ParamSpec

PREFIX = "operator.LocalManager."
KUBE_PREFIX = "operator.KubeManager."
CONTAINERNAME = "containername"
RUNTIME_CONTAINERNAME = "runtime-containername"
K8S_PODNAME = "k8s-podname"
K8S_NAMESPACE = "k8s-namespace"
K8S_CONTAINERNAME = "k8s-containername"
K8S_SELECTOR = "k8s-selector"
IMAGE_DIGEST = "runtime-containerimage-digest"
IMAGE_ID = "runtime-containerimage-id"
HOST = "host"
_FILTERING = "group:Data Filtering"


def _kube(*keys: str) -> tuple[str, ...]:
    return tuple(KUBE_PREFIX + k for k in keys)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(K8S_PODNAME, PREFIX, "Kubernetes pods to filter on. Supports comma-separated "
              "list and exclusion using '!'.", title="K8s Pod Name", tags=(_FILTERING,),
              value_hint="k8s:pod", old_keys=_kube("podname", K8S_PODNAME)),
    ParamSpec(K8S_NAMESPACE, PREFIX, "Kubernetes namespaces to filter on. Supports "
              "comma-separated list and exclusion using '!'.", title="K8s Namespace",
              tags=(_FILTERING,), value_hint="k8s:namespace",
              old_keys=_kube("namespace", K8S_NAMESPACE)),
    ParamSpec(K8S_SELECTOR, PREFIX, "Kubernetes Labels selector to filter on. Supports "
              "comma-separated list and exclusion using '!' (e.g. '!key=value' or "
              "'key=!value').", title="K8s Label Selector", tags=(_FILTERING,),
              value_hint="k8s:labels", old_keys=_kube("selector", K8S_SELECTOR)),
    ParamSpec(K8S_CONTAINERNAME, PREFIX, "Kubernetes container names to filter on. Supports "
              "comma-separated list and exclusion using '!'.", title="K8s Container Name",
              tags=(_FILTERING,), value_hint="k8s:container",
              old_keys=_kube("containername", K8S_CONTAINERNAME)),
    ParamSpec(CONTAINERNAME, PREFIX, "runtime-assigned name container names to filter on (not "
              "the name defined in the pod spec). Supports comma-separated list and exclusion "
              "using '!'.", title="Runtime Container Name", alias="c", tags=(_FILTERING,),
              alternative_key=RUNTIME_CONTAINERNAME, value_hint="local:container",
              old_keys=_kube(RUNTIME_CONTAINERNAME)),
    ParamSpec(IMAGE_DIGEST, PREFIX, "runtime-assigned container image digest to filter on. "
              "Supports comma-separated list and exclusion using '!'.",
              title="Runtime Container Image Digest", tags=(_FILTERING,),
              value_hint="local:image-digest", old_keys=_kube(IMAGE_DIGEST)),
    ParamSpec(IMAGE_ID, PREFIX, "runtime-assigned container image ID to filter on. Supports "
              "comma-separated list and exclusion using '!'.", title="Runtime Container Image ID",
              tags=(_FILTERING,), value_hint="local:image-id", old_keys=_kube(IMAGE_ID)),
    ParamSpec(HOST, PREFIX, "Show data from both the host and containers", "false", "bool",
              title="Host Data", tags=("group:Data Collection",)),
)

def _match_list(spec: str, *values: str) -> bool:
    """upstream's matchFilterString: any inclusion must match, no exclusion may."""
    if not spec:
        return True
    included = matched = False
    for part in spec.split(","):
        if part.startswith("!"):
            if part[1:] in values:
                return False
        else:
            included = True
            matched = matched or part in values
    return matched or not included


def _short_digest(d: str) -> str:
    """upstream's cleanDigest: without the algorithm, at most 12 characters."""
    return d.partition(":")[2][:12] if ":" in d else d[:12]


def _match_digest(spec: str, value: str) -> bool:
    if not spec:
        return True
    parts = [("!" + _short_digest(p[1:])) if p.startswith("!") else _short_digest(p)
             for p in spec.split(",")]
    return _match_list(",".join(parts), _short_digest(value))


@dataclass(frozen=True, slots=True)
class ContainerSelector:
    """Which containers a run wants (see the module doc); empty fields match anything."""

    namespace: str = ""
    pod_name: str = ""
    k8s_container_name: str = ""
    container_name: str = ""
    image_digest: str = ""
    image_id: str = ""
    pod_labels: Sequence[tuple[str, str]] = field(default=())
    host: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ContainerSelector:
        """The selector of a run's resolved params (keys with :data:`PREFIX`)."""
        def text(key: str) -> str:
            v = values.get(PREFIX + key)
            return "" if v is None else str(v)

        labels = []
        for pair in text(K8S_SELECTOR).split(","):
            k, sep, v = pair.partition("=")
            if sep and k:
                labels.append((k, v))
        return cls(namespace=text(K8S_NAMESPACE), pod_name=text(K8S_PODNAME),
                   k8s_container_name=text(K8S_CONTAINERNAME),
                   container_name=text(CONTAINERNAME), image_digest=text(IMAGE_DIGEST),
                   image_id=text(IMAGE_ID), pod_labels=tuple(labels),
                   host=bool(values.get(PREFIX + HOST)))

    @property
    def given(self) -> bool:
        """Whether any selection param is set."""
        return bool(self.namespace or self.pod_name or self.k8s_container_name or
                    self.container_name or self.image_digest or self.image_id or
                    self.pod_labels)

    @property
    def active(self) -> bool:
        """Whether records are limited to matching containers (host processes left out)."""
        return self.given and not self.host

    def matches(self, c: Container) -> bool:
        if not (_match_list(self.namespace, c.namespace) and _match_list(self.pod_name, c.pod_name)
                and _match_list(self.k8s_container_name, c.k8s_container_name)
                and _match_list(self.container_name, c.name)
                and _match_digest(self.image_id, c.image_digest)
                and _match_digest(self.image_digest, c.image_digest)):
            return False
        for key, want in self.pod_labels:
            if key.startswith("!"):
                have = c.pod_labels.get(key[1:])
                if have is not None and _match_list(want, have):
                    return False
            else:
                have = c.pod_labels.get(key)
                if have is None or not _match_list(want, have):
                    return False
        return True

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (
            (K8S_NAMESPACE, self.namespace), (K8S_PODNAME, self.pod_name),
            (K8S_CONTAINERNAME, self.k8s_container_name), (CONTAINERNAME, self.container_name),
            (IMAGE_DIGEST, self.image_digest), (IMAGE_ID, self.image_id)) if v]
        if self.pod_labels:
            parts.append(K8S_SELECTOR + "=" + ",".join(f"{k}={v}" for k, v in self.pod_labels))
        return " ".join(parts)
