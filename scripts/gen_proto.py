"""Generates the protobuf and gRPC modules from proto/.

Two schemas:

- ``proto/gadget_service.proto`` -> ``pipeline/_gen`` (protobuf, grpcio and grpclib modules),
  compiled as if it lived at pipeline/_gen/, so the generated modules import each other as
  ``pipeline._gen.…``.
- ``proto/containerd/`` -> ``pipeline/containers/_gen`` (protobuf and grpclib modules): the
  subset of containerd's own API protos the container collection speaks, copied verbatim from
  the Go module ``github.com/containerd/containerd/api`` (version in
  ``proto/containerd/VERSION``). Their imports name each other relative to the module root
  (``import "types/mount.proto"``); they are staged under pipeline/containers/_gen/ with those
  imports rewritten to that prefix, so the generated modules import
  ``pipeline.containers._gen.…`` instead of shadowing the standard library's ``types``.

Run with the venv's python; ``--check`` exits 1 when the committed files are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_IMPORT = re.compile(r'^(import\s+(?:public\s+|weak\s+)?")(?!google/)([^"]+\.proto)(";)', re.M)


@dataclass(frozen=True)
class Schema:
    """One proto tree and where its modules go."""

    source: Path  # a .proto file or a directory of them
    package: str  # the Python package the modules live in, dotted
    grpcio: bool  # also grpcio stubs (the gadget service's clients use grpcio)
    doc: str  # the generated package's docstring

    @property
    def out(self) -> Path:
        return ROOT.joinpath(*self.package.split("."))

    def protos(self) -> list[Path]:
        if self.source.is_file():
            return [self.source]
        return sorted(self.source.rglob("*.proto"))

    def rel(self, proto: Path) -> Path:
        return Path(proto.name) if self.source.is_file() else proto.relative_to(self.source)


SCHEMAS = (
    Schema(ROOT / "proto" / "gadget_service.proto", "pipeline._gen", True,
           "Generated from proto/gadget_service.proto."),
    Schema(ROOT / "proto" / "containerd", "pipeline.containers._gen", False,
           "Generated from containerd's API protos in proto/containerd/."),
)


def _outputs(schema: Schema, proto: Path) -> list[Path]:
    stem = schema.rel(proto).with_suffix("")
    names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    if "service " in proto.read_text():
        names.append(f"{stem}_grpc.py")
        if schema.grpcio:
            names.append(f"{stem}_pb2_grpc.py")
    return [Path(n) for n in names]


def expected(schema: Schema) -> list[Path]:
    """Every generated file of ``schema``, relative to its package, ``__init__.py`` included."""
    files: set[Path] = {Path("__init__.py")}
    for proto in schema.protos():
        for out in _outputs(schema, proto):
            files.add(out)
            for parent in out.parents:
                if parent != Path("."):
                    files.add(parent / "__init__.py")
    return sorted(files)


def generate(schema: Schema, out_root: Path) -> None:
    """Writes ``schema``'s modules under ``out_root`` (laid out as the repository is)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    prefix = "/".join(schema.package.split("."))
    with tempfile.TemporaryDirectory() as inc:
        staged = []
        for proto in schema.protos():
            dst = Path(inc) / prefix / schema.rel(proto)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_IMPORT.sub(lambda m: f"{m[1]}{prefix}/{m[2]}{m[3]}",
                                       proto.read_text()))
            staged.append(str(dst))
        # protoc finds the grpclib plugin on PATH, next to this interpreter.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        well_known = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{inc}", f"-I{well_known}", f"--python_out={out_root}",
                f"--pyi_out={out_root}", f"--grpclib_python_out={out_root}"]
        if schema.grpcio:
            args.append(f"--grpc_python_out={out_root}")
        rc = protoc.main([*args, *staged])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc} on {schema.source}")
    pkg = out_root / prefix
    for rel in expected(schema):
        if rel.name == "__init__.py":
            doc = schema.doc if rel.parent == Path(".") else "Generated; see the parent package."
            (pkg / rel).write_text(f'"""{doc}"""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    status = 0
    for schema in SCHEMAS:
        with tempfile.TemporaryDirectory() as tmp:
            generate(schema, Path(tmp))
            fresh = Path(tmp).joinpath(*schema.package.split("."))
            files = expected(schema)
            if args.check:
                stale = [str(n) for n in files if not (schema.out / n).exists()
                         or not filecmp.cmp(fresh / n, schema.out / n, shallow=False)]
                if stale:
                    print(f"stale generated files in {schema.package}: {stale}; run "
                          "scripts/gen_proto.py", file=sys.stderr)
                    status = 1
                continue
            for n in files:
                (schema.out / n).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(fresh / n, schema.out / n)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
