"""Derived fields: the readable forms upstream Inspektor Gadget's operators add to a record
(timestamp text, errno and signal names, open flags and mode text, user and group names,
addresses with their protocol, enum names, ...), computed per batch, in extra payloads, and
only when someone reads them.

How a gadget gets derived fields
--------------------------------
Most need no declaration: they follow from the C types of the struct members, exactly as
upstream's formatters pick them (the rules are in :func:`plan.build_plan`):

============================  ==========================================================
member type                   derived field (String, beside the member, same parent)
============================  ==========================================================
``gadget_timestamp x_raw``    ``x``: ``2006-01-02T15:04:05.000000000Z07:00``, local zone
``gadget_errno x_raw``        ``x``: ``ENOENT``; empty for 0; ``error#<n>`` if unknown
``gadget_signal x_raw``       ``x``: ``SIGKILL``; ``signal#<n>`` if unknown
``gadget_file_flags x_raw``   ``x``: ``O_WRONLY|O_CREAT|O_CLOEXEC``
``gadget_file_mode x_raw``    ``x``: ``-rw-r-----`` (Go's ``fs.FileMode`` text)
``gadget_syscall x_raw``      ``x``: ``SYS_OPENAT``
``gadget_bytes x_raw``        ``x``: ``1.5 kB``
``gadget_duration x_raw``     ``x``: ``1.23ms``
``gadget_uid uid``            ``user`` (hidden): from /etc/passwd, ``uid:<n>`` if unnamed
``gadget_gid gid``            ``group`` (hidden): from /etc/group, ``gid:<n>`` if unnamed
``struct gadget_l3endpoint_t``  ``.addr`` (text); ``addr_raw`` becomes unreferenced
``struct gadget_l4endpoint_t``  ``.addr``, ``.proto`` (``TCP``), ``.endpoint`` (``a:port``)
``enum <e> x_raw``            ``x``: the member's name (``UNKNOWN``); ``*_set`` enums: the
                              names of all set bits joined by ``|``
============================  ==========================================================

The raw member is then hidden in columns output (unless gadget.yaml says otherwise), as
upstream does. The name of the derived field is the member's without ``_raw``, or the value
of the annotation ``formatters.<kind>.target`` (``uidgidresolver.target`` for users and
groups, ``ebpf.formatter.enum`` for enums) on the member. Enums are declared once per gadget,
since the struct lines are not C::

    enums:
      pkt_type_t: {type: u8, values: [HOST, BROADCAST, MULTICAST]}   # or {NAME: value, ...}
    structs:
      event:
        - enum pkt_type_t pkt_type_raw

A field only the gadget knows how to compute is declared under its data source, with the name
of a function in the gadget's ``hooks.py``::

    datasources:
      dns:
        derived:
          qr: {from: qr_text}                  # kind: string (default), or bool, uint16, ...
          tc: {from: truncated, kind: bool, hidden: true, order: 0}

    # hooks.py
    def qr_text(batch: Batch, memo: dict) -> list[bytes] | Coded: ...

The function gets the raw batch (payload 0 and the payloads its source filled) and a dict
shared by the derivations of that batch; it returns one payload entry per record (numbers as
exactly their width, little-endian), plainly or as a :class:`~pipeline.batch.Coded` column. It
must be vectorised over the batch (numpy over the columns, or work per distinct value), never
a Python loop per record. Annotations of derived fields are set under ``fields:`` like any
other field's; ``template:`` works there too.

How it runs
-----------
Each run's first operator (:class:`pipeline.operators.derive.Derive`) announces the derived
fields and appends one :class:`~pipeline.batch.LazyColumn` per derived field to each batch, in
payload order after the source's own payloads. Payload 0 stays the untouched BPF record.
Nothing is computed until a consumer reads a derived column (an encoder of the gRPC stream, a
JSON sink, a filter on ``error``, a metric label); what one consumer computed, the others of
the same batch reuse. Consumers declare what they read by the fields they touch: a gRPC client
reads every announced field, so ``operator.fields.fields`` that names only raw fields removes
the derived payloads from the stream (pipeline/operators/fields.py) and nothing is derived; a
Prometheus sink counting by ``proc.comm`` reads that column only. ``Derive.stats`` counts what
was computed.
"""

from __future__ import annotations

from pipeline.derive.plan import (
    DeclaredField,
    DeriveEnv,
    DeriveError,
    DerivePlan,
    DeriveSpec,
    EnumSpec,
    build_plan,
)

__all__ = ["DeclaredField", "DeriveEnv", "DeriveError", "DerivePlan", "DeriveSpec", "EnumSpec",
           "build_plan"]
