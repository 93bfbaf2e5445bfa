// The one header a gadget program includes: ring buffer first (its table must be declared
// before any other, see gadget_ringbuf.h), then the shared types and the in-kernel filters.
#ifndef GADGETPIPE_GADGET_H
#define GADGETPIPE_GADGET_H
#include "gadget_ringbuf.h"

// Typedefs that name a field's meaning; user space tags fields with them (type:<name>) and,
// e.g., rewrites gadget_timestamp fields from boot time to wall-clock time. Must match
// common.yaml. Fields typed with them get upstream's readable companions (pipeline/derive):
// gadget_errno -> error name, gadget_signal -> signal name, gadget_file_flags/_mode -> text,
// gadget_uid/_gid -> user/group name, gadget_syscall -> syscall name, gadget_bytes/_duration
// -> human text.
typedef __u64 gadget_timestamp;
typedef __u64 gadget_mntns_id;
typedef __u32 gadget_netns_id;
typedef __u32 gadget_signal;
typedef __u32 gadget_errno;
typedef __u32 gadget_uid;
typedef __u32 gadget_gid;
typedef __u64 gadget_syscall;
typedef __u32 gadget_file_mode;
typedef __u32 gadget_file_flags;
typedef __u32 gadget_kernel_stack;
typedef __u32 gadget_pid;
typedef __u32 gadget_ppid;
typedef __u32 gadget_tid;
typedef __u32 gadget_ptid;
typedef char gadget_comm;
typedef char gadget_pcomm;
typedef __u64 gadget_bytes;
typedef __u64 gadget_duration;
#include "gadget_types.h"
#include "gadget_filter.h"

// Declares a one-entry array of the record struct so user space can compare the layout clang
// computed with gadget.yaml's (bcc exposes the parsed struct as the table's leaf type).
#define GADGET_LAYOUT(ds, type) BPF_ARRAY(gadget_layout_##ds, type, 1)
#endif
