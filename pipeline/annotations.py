"""Field annotations as upstream Inspektor Gadget sets them, so clients format our fields as
they format upstream's.

- Every field starts with :data:`DEFAULT_ANNOTATIONS` (columns width 16, ellipsis at the end,
  left-aligned).
- A ``template`` annotation expands to a set of annotations (:data:`TEMPLATES`, upstream's
  ``metadatav1.AnnotationsTemplates``), before the gadget's own settings, which win.
- Struct members whose C type is one of the ``gadget_*`` typedefs get that type's template
  (``gadget_comm`` -> ``comm``, ``gadget_timestamp`` -> ``timestamp``, ...; :func:`for_types`);
  members of type ``gadget_process``, ``gadget_creds`` and ``gadget_parent`` are hidden, and the
  members inside those structs get their own name as ``columns.alias``.
- A field is hidden (flag ``Hidden``) when its ``columns.hidden`` annotation is ``"true"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

COLUMNS_HIDDEN = "columns.hidden"
COLUMNS_ALIAS = "columns.alias"
COLUMNS_REPLACE = "columns.replace"
COLUMNS_WIDTH = "columns.width"
DESCRIPTION = "description"
TEMPLATE = "template"
VALUE_ONE_OF = "value.one-of"
JSON_SKIP = "json.skip"

DEFAULT_ANNOTATIONS: Mapping[str, str] = MappingProxyType({
    "columns.width": "16", "columns.ellipsis": "end", "columns.alignment": "left",
})

TEMPLATES: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "timestamp": {"columns.width": "35", "columns.maxwidth": "35", "columns.ellipsis": "end",
                  "columns.hidden": "true", "description": "Microseconds since Unix epoch"},
    "bytes": {"columns.width": "10", "columns.alignment": "right"},
    "duration": {"columns.width": "20", "columns.alignment": "right"},
    "node": {"columns.width": "30", "columns.ellipsis": "middle"},
    "pod": {"columns.width": "30", "columns.ellipsis": "middle"},
    "container": {"columns.width": "30"},
    "namespace": {"columns.width": "30"},
    "containerImageName": {"columns.width": "30"},
    "containerPid": {"columns.width": "6", "columns.hidden": "true",
                     "columns.alignment": "right"},
    "containerImageDigest": {"columns.width": "30"},
    "containerStartedAt": {"columns.hidden": "true", "columns.width": "35"},
    "comm": {"description": "Process name", "columns.maxwidth": "16"},
    "pcomm": {"description": "Parent process name", "columns.maxwidth": "16",
              "columns.hidden": "true"},
    "pid": {"description": "Process ID", "columns.minwidth": "7", "columns.alignment": "right"},
    "ppid": {"description": "Parent process ID", "columns.minwidth": "7",
             "columns.alignment": "right", "columns.hidden": "true"},
    "tid": {"description": "Thread ID", "columns.minwidth": "7", "columns.alignment": "right"},
    "ptid": {"description": "Parent thread ID", "columns.minwidth": "7",
             "columns.alignment": "right", "columns.hidden": "true"},
    "uid": {"description": "User ID", "columns.minwidth": "8", "columns.alignment": "right"},
    "gid": {"description": "Group ID", "columns.minwidth": "8", "columns.alignment": "right"},
    "ns": {"columns.hidden": "true", "columns.width": "12", "columns.alignment": "right"},
    "mntns_id": {"description": "Mount namespace ID", "columns.hidden": "true",
                 "columns.width": "12", "columns.alignment": "right"},
    "netns_id": {"description": "Network namespace ID", "columns.hidden": "true",
                 "columns.width": "12", "columns.alignment": "right"},
    "l4endpoint": {"columns.minwidth": "22", "columns.width": "40", "columns.maxwidth": "52",
                   "columns.ellipsis": "middle"},
    "syscall": {"description": "Syscall", "columns.width": "18", "columns.maxwidth": "28"},
    "errorString": {"columns.width": "12"},
    "user_stack": {"description": "User stack trace", "columns.hidden": "true"},
})

# Typedefs whose template a struct member of that type gets (upstream's ebpf operator).
_TYPE_TEMPLATES = frozenset({
    "gadget_comm", "gadget_uid", "gadget_gid", "gadget_pid", "gadget_tid", "gadget_timestamp",
    "gadget_mntns_id", "gadget_netns_id", "gadget_pcomm", "gadget_ppid", "gadget_user_stack",
})
PROCESS_STRUCTS = frozenset({"gadget_process", "gadget_creds", "gadget_parent"})


def expand_template(name: str, dst: dict[str, str]) -> bool:
    """Adds template ``name``'s annotations to ``dst``; False when there is no such template."""
    t = TEMPLATES.get(name)
    if t is None:
        return False
    dst.update(t)
    return True


def for_types(type_names: Iterable[str], parent_struct: str, member: str) -> dict[str, str]:
    """The annotations upstream gives a struct member from its C types (typedef chain and
    struct name, outermost first) and the struct it sits in."""
    out: dict[str, str] = {}
    for t in type_names:
        if t in _TYPE_TEMPLATES:
            expand_template(t.removeprefix("gadget_"), out)
        elif t in PROCESS_STRUCTS:
            out[COLUMNS_HIDDEN] = "true"
    if parent_struct in PROCESS_STRUCTS:
        out[COLUMNS_ALIAS] = member
    return out


def configured(annotations: Mapping[str, str], config: Mapping[str, str]) -> dict[str, str]:
    """A field's annotations after the gadget's settings for it: a ``template`` among them is
    expanded first, then the settings themselves win."""
    out = dict(annotations)
    if TEMPLATE in config:
        expand_template(config[TEMPLATE], out)
    out.update(config)
    return out


def hidden(annotations: Mapping[str, str]) -> bool:
    return annotations.get(COLUMNS_HIDDEN) == "true"
