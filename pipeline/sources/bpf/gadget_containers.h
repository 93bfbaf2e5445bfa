/* In-kernel container selection (pipeline/containers/kernel_filter.py writes the map).
 *
 * With -DGADGET_FILTER_CONTAINERS=1 (the tracer adds it when a run selects containers) this
 * declares gadget_mntns_filter, a hash of mount namespace id -> 1 (keep) or 0 (discard), and
 * gadget_should_discard() also discards a task whose mount namespace maps to 0. A namespace
 * the map does not hold passes: user space classifies it (a container the runtime has not
 * reported yet, or a host namespace), drops its records if unselected, and writes the answer
 * here. Without the macro no table is declared and gadget_should_discard() is exactly
 * gadget_filter_discard() (gadget_filter.h defines it so then).
 *
 * The map is reached through its pseudo fd (bcc does not rewrite map methods written in
 * headers; see gadget_ringbuf.h), so the includer says which table it is:
 * GADGET_MNTNS_FILTER_IDX. gadget_lost.h includes this after its own tables (rings, then
 * gadget_lost, then gadget_sample.h's); a program without rings includes it before any table
 * of its own with GADGET_MNTNS_FILTER_IDX 1.
 *
 * gadget_should_discard() is a macro so that it expands where it is used, after the program's
 * table declarations, not where gadget_filter.h is included.
 */
#ifndef GADGETPIPE_GADGET_CONTAINERS_H
#define GADGETPIPE_GADGET_CONTAINERS_H

#ifdef GADGET_FILTER_CONTAINERS
#ifndef GADGET_MNTNS_FILTER_IDX
#error "define GADGET_MNTNS_FILTER_IDX (this table's position) before including gadget_containers.h"
#endif
#define GADGET_MNTNS_FILTER_MAX 16384
BPF_HASH(gadget_mntns_filter, __u64, __u8, GADGET_MNTNS_FILTER_MAX);

/* True when the selection leaves mount namespace `mntns` out. */
static __always_inline bool gadget_mntns_unselected(__u64 mntns)
{
	__u8 *keep = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -(GADGET_MNTNS_FILTER_IDX)),
					 &mntns);

	return keep && !*keep;
}

#define gadget_should_discard() \
	(gadget_filter_discard() || gadget_mntns_unselected(gadget_get_mntns_id()))
#else
#define gadget_mntns_unselected(mntns) 0
#endif

#endif
