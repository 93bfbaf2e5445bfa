"""The committed stubs match proto/ (regenerate with scripts/gen_proto.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rpc_paths_are_upstreams() -> None:
    from pipeline._gen import gadget_service_pb2 as pb

    services = {s.full_name: [m.name for m in s.methods]
                for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "api.BuiltInGadgetManager": ["GetInfo", "RunBuiltInGadget"],
        "api.GadgetManager": ["GetGadgetInfo", "RunGadget"],
        "api.GadgetInstanceManager": ["CreateGadgetInstance", "ListGadgetInstances",
                                      "GetGadgetInstance", "RemoveGadgetInstance"],
    }


def test_containerd_rpcs_the_collection_calls_exist() -> None:
    from pipeline.containers._gen.services.containers.v1 import containers_pb2
    from pipeline.containers._gen.services.events.v1 import events_pb2
    from pipeline.containers._gen.services.images.v1 import images_pb2
    from pipeline.containers._gen.services.tasks.v1 import tasks_pb2
    from pipeline.containers._gen.services.version.v1 import version_pb2

    methods = {s.full_name: {m.name for m in s.methods}
               for mod in (containers_pb2, events_pb2, images_pb2, tasks_pb2, version_pb2)
               for s in mod.DESCRIPTOR.services_by_name.values()}
    assert {"List", "Get"} <= methods["containerd.services.containers.v1.Containers"]
    assert "Subscribe" in methods["containerd.services.events.v1.Events"]
    assert "List" in methods["containerd.services.tasks.v1.Tasks"]
    assert "Get" in methods["containerd.services.images.v1.Images"]
    assert "Version" in methods["containerd.services.version.v1.Version"]
