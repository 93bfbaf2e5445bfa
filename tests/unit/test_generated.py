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
    from api._gen import gadget_service_pb2 as pb

    services = {s.full_name: [m.name for m in s.methods]
                for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "api.BuiltInGadgetManager": ["GetInfo", "RunBuiltInGadget"],
        "api.GadgetManager": ["GetGadgetInfo", "RunGadget"],
        "api.GadgetInstanceManager": ["CreateGadgetInstance", "ListGadgetInstances",
                                      "GetGadgetInstance", "RemoveGadgetInstance"],
    }
