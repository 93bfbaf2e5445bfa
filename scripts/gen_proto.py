"""Generates the protobuf, grpcio and grpclib modules under api/_gen from proto/.

The proto is compiled as if it lived at api/_gen/, so the generated modules import each other
as ``api._gen.…``. Run with the venv's python; ``--check`` exits 1 when the committed files are
stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "gadget_service.proto"
GEN = ROOT / "api" / "_gen"
OUTPUTS = ("gadget_service_pb2.py", "gadget_service_pb2.pyi", "gadget_service_pb2_grpc.py",
           "gadget_service_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as inc:
        staged = Path(inc) / "api" / "_gen"
        staged.mkdir(parents=True)
        shutil.copy(PROTO, staged / PROTO.name)
        # protoc finds the grpclib plugin on PATH, next to this interpreter.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        well_known = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{inc}", f"-I{well_known}",
            f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", f"--grpclib_python_out={out_root}",
            str(staged / PROTO.name),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "api" / "_gen"
        if args.check:
            stale = [n for n in OUTPUTS if not (GEN / n).exists()
                     or not filecmp.cmp(fresh / n, GEN / n, shallow=False)]
            if stale:
                print(f"stale generated files: {stale}; run scripts/gen_proto.py", file=sys.stderr)
                return 1
            return 0
        GEN.mkdir(parents=True, exist_ok=True)
        for n in OUTPUTS:
            shutil.copy(fresh / n, GEN / n)
        (GEN / "__init__.py").write_text('"""Generated from proto/gadget_service.proto."""\n')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
