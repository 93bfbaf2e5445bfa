/* Per-ring loss counter; a program includes this right after its GADGET_RINGBUF declarations
 * (rings must be its first tables, see gadget_ringbuf.h), defining GADGET_NUM_RINGS first when
 * it has more than one ring. bcc rewrites map methods only in the program's own file, so this
 * header reaches the table through its pseudo fd: it is table GADGET_NUM_RINGS + 1. It also
 * brings gadget_sample.h (load shedding), whose tables, when shedding is compiled in, follow. */
#ifndef GADGETPIPE_GADGET_LOST_H
#define GADGETPIPE_GADGET_LOST_H

#ifndef GADGET_NUM_RINGS
#define GADGET_NUM_RINGS 1
#endif

BPF_PERCPU_ARRAY(gadget_lost, __u64, GADGET_MAX_RINGS);

static __always_inline void gadget_count_lost(__u32 ring_idx)
{
	__u32 key = ring_idx - 1;
	__u64 *v = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -(GADGET_NUM_RINGS + 1)), &key);

	if (v)
		__sync_fetch_and_add(v, 1); /* a nested program on this CPU may count too */
}

#include "gadget_sample.h"

/* The container selection's map follows: after gadget_lost and, with shedding, its two. */
#ifdef GADGET_SHED
#define GADGET_MNTNS_FILTER_IDX (GADGET_NUM_RINGS + 4)
#else
#define GADGET_MNTNS_FILTER_IDX (GADGET_NUM_RINGS + 2)
#endif
#include "gadget_containers.h"
#endif
