// The one header a gadget program includes: ring buffer first (its table must be declared
// before any other, see gadget_ringbuf.h), then the shared types and the in-kernel filters.
#ifndef GADGETPIPE_GADGET_H
#define GADGETPIPE_GADGET_H
#include "gadget_ringbuf.h"
#include "gadget_types.h"
#include "gadget_filter.h"

// Declares a one-entry array of the record struct so user space can compare the layout clang
// computed with gadget.yaml's (bcc exposes the parsed struct as the table's leaf type).
#define GADGET_LAYOUT(ds, type) BPF_ARRAY(gadget_layout_##ds, type, 1)
#endif
