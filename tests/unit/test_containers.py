"""The container collection and selection without a runtime: upstream's matching rules, the
KubeManager keys, the collection's events, lookup table and namespace fds (the runtime itself
is exercised in tests/e2e/test_containers.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.containers import collection as collection_mod
from pipeline.containers.collection import ContainerCollection, ContainerEvent, EventKind
from pipeline.containers.model import Container, pod_labels
from pipeline.containers.selector import PARAMS, PREFIX, ContainerSelector
from pipeline.params import ParamError, resolve


def _c(**kw: object) -> Container:
    base = Container(id="c", name="app", namespace="shop", pod_name="web-0",
                     k8s_container_name="app", image_digest="sha256:0123456789abcdef0000",
                     pod_labels={"app": "web", "tier": "front"})
    return base.with_(**kw)


@pytest.mark.parametrize(("key", "value", "matches"), [
    ("k8s-podname", "web-0", True),
    ("k8s-podname", "web-1,web-0", True),
    ("k8s-podname", "!web-0", False),
    ("k8s-podname", "!web-1", True),
    ("k8s-podname", "web-1,!web-0", False),
    ("k8s-namespace", "shop", True),
    ("k8s-namespace", "other", False),
    ("k8s-containername", "app", True),
    ("containername", "app", True),
    ("runtime-containername", "nope", False),
    ("runtime-containerimage-digest", "0123456789ab", True),
    ("runtime-containerimage-digest", "sha256:0123456789abFFFF", True),  # first 12 compared
    ("runtime-containerimage-digest", "!0123456789ab", False),
    ("k8s-selector", "app=web", True),
    ("k8s-selector", "app=web,tier=back", False),
    ("k8s-selector", "app=web,tier=!back", True),
    ("k8s-selector", "!tier=front", False),
    ("k8s-selector", "missing=x", False),
])
def test_selection_matches_as_upstream(key: str, value: str, matches: bool) -> None:
    values = {PREFIX + key: value}
    if key == "runtime-containername":
        values = {PREFIX + "containername": value}
    sel = ContainerSelector.from_values(values)
    assert sel.given and sel.active
    assert sel.matches(_c()) is matches


def test_host_turns_selection_off_and_nothing_given_is_no_selection() -> None:
    assert not ContainerSelector.from_values({}).active
    sel = ContainerSelector.from_values({PREFIX + "k8s-podname": "x", PREFIX + "host": True})
    assert sel.given and not sel.active


def test_kubemanager_keys_mean_the_local_ones() -> None:
    got = resolve(PARAMS, {"operator.KubeManager.podname": "p",
                           "operator.KubeManager.namespace": "n",
                           "operator.KubeManager.containername": "c",
                           "operator.KubeManager.selector": "a=b",
                           "operator.KubeManager.all-namespaces": "true"}, (PREFIX,))
    assert got[PREFIX + "k8s-podname"] == "p" and got[PREFIX + "k8s-namespace"] == "n"
    assert got[PREFIX + "k8s-containername"] == "c" and got[PREFIX + "k8s-selector"] == "a=b"
    # Accepted, never announced: announced, they would be gadgetctl flags twice.
    assert all(not p.key.startswith("operator.KubeManager") for p in PARAMS)
    with pytest.raises(ParamError, match="given twice"):
        resolve(PARAMS, {"operator.KubeManager.podname": "p", PREFIX + "k8s-podname": "q"},
                (PREFIX,))


def test_pod_labels_leave_out_the_cri_bookkeeping() -> None:
    assert pod_labels({"app": "web", "io.kubernetes.pod.name": "p", "io.kubernetes.pod.uid": "u",
                       "io.cri-containerd.kind": "sandbox", "io.kubernetes.cri.x": "y"}) == \
        {"app": "web"}


@pytest.fixture
def child() -> Iterator[int]:
    """A live process to stand for a container's init (its namespaces are the host's)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_task_adds_the_container_by_its_namespaces_and_its_end_retires_it(
        child: int, monkeypatch: pytest.MonkeyPatch) -> None:
    coll = ContainerCollection(host_netns=0)
    events: list[ContainerEvent] = []
    unsubscribe = coll.subscribe(events.append)
    coll.set_metadata(Container.from_labels("c1", {"io.kubernetes.pod.name": "p",
                                                   "io.kubernetes.pod.uid": "u1"}))
    assert events == [] and coll.containers() == []
    c = coll.start_task("c1", child, started_at=123)
    assert c is not None and c.mntns == os.stat(f"/proc/{child}/ns/mnt").st_ino
    assert c.pid == child and c.started_at == 123 and c.netns
    assert [e.kind for e in events] == [EventKind.ADDED]
    # The pod's sandbox brings its labels.
    coll.set_metadata(Container.from_labels("sb", {"io.cri-containerd.kind": "sandbox",
                                                   "io.kubernetes.pod.uid": "u1", "app": "x"}))
    last = events[-1]
    assert last.kind is EventKind.UPDATED and last.container.pod_labels == {"app": "x"}
    table = coll.table()
    rows = table.rows_by_mntns(np.array([c.mntns, 1, c.mntns], dtype=np.uint64))
    assert rows.tolist() == [1, 0, 1] and table.containers[0].id == "c1"
    # Its end: removed for listeners, still found for records drained meanwhile ...
    coll.end_task("c1")
    assert [e.kind for e in events][-1] is EventKind.REMOVED and coll.containers() == []
    assert coll.table().rows_by_mntns(np.array([c.mntns], dtype=np.uint64)).tolist() == [1]
    # ... until it retires.
    monkeypatch.setattr(collection_mod, "RETIRE_S", 0.0)
    coll._next_expiry = 0.0
    assert coll.table().rows_by_mntns(np.array([c.mntns], dtype=np.uint64)).tolist() == [0]
    assert coll.get("c1") is None
    unsubscribe()
    coll.close()


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own fd is gone by now
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def test_the_collection_holds_the_namespaces_of_its_containers(child: int) -> None:
    coll = ContainerCollection(host_netns=0)
    coll.set_metadata(Container.from_labels("c1", {}))
    before = _fds()
    coll.start_task("c1", child)
    held = {link for fd, link in _fds().items() if fd not in before}
    assert {h.split(":")[0] for h in held} == {"mnt", "net"}
    coll.close()
    assert _fds() == before


def test_a_pod_sharing_a_network_namespace_is_found_by_it() -> None:
    coll = ContainerCollection(host_netns=1)
    for cid in ("a", "b"):
        coll.upsert(Container.from_labels(cid, {"io.kubernetes.pod.name": "p",
                                                "io.kubernetes.pod.namespace": "n",
                                                "io.kubernetes.pod.uid": "u"}).with_(
            pid=10, mntns=100 + ord(cid), netns=500))
    coll.upsert(Container(id="hostnet", pid=11, mntns=300, netns=1, host_network=True))
    t = coll.table()
    [row] = t.rows_by_netns(np.array([500], dtype=np.uint64)).tolist()
    pod = t.containers[row - 1]
    assert pod.pod_name == "p" and pod.pid == 0  # the pod, not one of its containers
    assert t.rows_by_netns(np.array([1], dtype=np.uint64)).tolist() == [0]


def test_the_init_of_a_pid_namespace_is_found_from_proc() -> None:
    """A container learnt from a record before the runtime's task event still gets its init
    pid (runtime.containerPid): pid 1 of the process's own pid namespace."""
    from pipeline.containers import procfs

    outer = subprocess.Popen(["unshare", "-pf", "sh", "-c", "sleep 60 & wait"])
    cgdir = Path(procfs.cgroup2_mount() + f"/gp-test-{os.getpid()}-{outer.pid}")
    init = 0
    try:
        deadline = time.monotonic() + 30
        while True:  # the forked init and its child appear under unshare
            inits = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
            grand = (Path(f"/proc/{inits[0]}/task/{inits[0]}/children").read_text().split()
                     if inits else [])
            if grand:
                break
            assert time.monotonic() < deadline, "unshare did not start its namespace"
            time.sleep(0.01)  # polling /proc
        init, sleeper = int(inits[0]), int(grand[0])
        # Both in a cgroup of their own, as a container's processes are.
        cgdir.mkdir()
        for pid in (init, sleeper):
            (cgdir / "cgroup.procs").write_text(str(pid))
        path = "/" + cgdir.name
        assert procfs.container_init(init, path) == init
        assert procfs.container_init(sleeper, path) == init  # found among its cgroup
        assert procfs.container_init(outer.pid, "/nonexistent-cgroup") == 0
    finally:
        if init:
            os.kill(init, 9)  # the namespace's init: its processes go with it
        outer.kill()
        outer.wait()
        gone_by = time.monotonic() + 30
        while cgdir.exists() and time.monotonic() < gone_by:
            try:
                cgdir.rmdir()
            except OSError:  # still populated for a moment after the kill
                time.sleep(0.01)
