"""``api.BuiltInGadgetManager``: GetInfo, and the legacy RunBuiltInGadget."""

from __future__ import annotations

import json
from typing import Any

from api.context import ServiceContext
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.version import VERSION


def catalog_json(ctx: ServiceContext) -> bytes:
    """The pre-v0.42 catalog document: ``{"Gadgets": [...], "Operators": [...]}``."""
    gadgets = []
    for spec in ctx.catalog:
        gadgets.append({
            "id": spec.name, "name": spec.legacy_name or spec.name,
            "category": spec.category, "type": "trace" if spec.category == "trace" else
            spec.category, "description": spec.description,
            "params": [{"key": p.full_key, "description": p.description,
                        "defaultValue": p.default, "typeHint": p.type_hint} for p in spec.params],
            "columnsDefinition": {ds.name: [f.full_name for f in ds.fields if not f.hidden]
                                  for ds in spec.datasources},
            "operatorParamsCollection": {},
        })
    operators = [{"name": "filter", "description": "Filters records by field comparisons"},
                 {"name": "fields", "description": "Selects fields"}]
    return json.dumps({"Gadgets": gadgets, "Operators": operators}).encode()


class BuiltInGadgetManager(svc.BuiltInGadgetManagerBase):
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def GetInfo(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(pb.InfoResponse(
            version="1.0", catalog=catalog_json(self._ctx),
            experimental=_experimental(), serverVersion=VERSION))

    async def RunBuiltInGadget(self, stream: Any) -> None:
        from api.legacy_run import run_builtin

        await run_builtin(self._ctx, stream)


def _experimental() -> bool:
    import os

    return os.environ.get("IG_EXPERIMENTAL", "").lower() in ("1", "true", "yes")
