"""``GadgetInfo`` messages built from specs and runs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace

from pipeline._gen import gadget_service_pb2 as pb
from pipeline.gadget import GadgetSpec
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema, DataSourceType


def sorted_datasources(schemas: Iterable[DataSourceSchema]) -> list[DataSourceSchema]:
    """Data sources in wire order: sorted by name; a stream's ids are positions in this list."""
    return sorted(schemas, key=lambda s: s.name)


def as_array(schema: DataSourceSchema, linger: str) -> DataSourceSchema:
    """The schema announced to a client that asked for batched packets."""
    ann = {**schema.annotations, "fetch-interval": linger, "fetch-count": "0"}
    return replace(schema, type=DataSourceType.ARRAY, annotations=ann)


def gadget_info(spec: GadgetSpec, image: str, schemas: Sequence[DataSourceSchema],
                params: Iterable[ParamSpec], *, with_ids: bool, instance_id: str = "",
                instance_name: str = "") -> pb.GadgetInfo:
    return pb.GadgetInfo(
        name=instance_name, id=instance_id, imageName=image, metadata=spec.metadata,
        dataSources=[s.to_proto(i if with_ids else 0) for i, s in enumerate(schemas)],
        params=[p.to_proto() for p in params],
    )


def field_table(schemas: Iterable[DataSourceSchema]) -> bytes:
    """The field layout of each data source as JSON, for inspection."""
    return json.dumps({
        s.name: {"type": s.type.name.lower(), "recordSize": s.record_size, "fields": [
            {"name": f.full_name, "kind": f.base_kind.name, "array": f.is_array,
             "payloadIndex": f.payload_index, "offs": f.offs, "size": f.size,
             "flags": int(f.flags), "hidden": f.hidden} for f in s.fields]}
        for s in schemas}, indent=2).encode()
