/* Ring buffers for gadget records, drained by pipeline/sources/ringbuf.py in whole batches.
 *
 * Records are submitted with BPF_RB_NO_WAKEUP: waking user space per record costs a Python call
 * per record, which is what the batch reader avoids. User space drains on a timer instead, and
 * gadget_submit() forces a wake-up once the unread data passes GADGET_WAKEUP_BYTES so that a
 * burst is drained before the ring overflows.
 *
 * bcc does not rewrite "&events" for bpf_ringbuf_query(), but it does resolve
 * bpf_pseudo_fd(1, -N) to the N-th table the program declares (1-based). So rings must be the
 * first tables of a program, declared in order with their index:
 *
 *     GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
 *     #include "gadget_lost.h"      (declares gadget_lost after the rings)
 *
 * Reservation failures (ring full) are counted per ring in the per-CPU array gadget_lost at
 * index (ring index - 1); user space sums it into the loss ledger.
 */
#ifndef GADGETPIPE_GADGET_RINGBUF_H
#define GADGETPIPE_GADGET_RINGBUF_H

#ifndef GADGET_RING_PAGES
#define GADGET_RING_PAGES 2048
#endif
#ifndef GADGET_WAKEUP_BYTES
#define GADGET_WAKEUP_BYTES (GADGET_RING_PAGES * 4096 / 4)
#endif
#define GADGET_MAX_RINGS 8

#define GADGET_RINGBUF(name, pages, idx) \
	BPF_RINGBUF_OUTPUT(name, pages);     \
	enum { gadget_ring_idx_##name = (idx) }

/* bcc refuses map methods (name.ringbuf_reserve()) inside macros, so these call the helpers
 * with the ring's pseudo fd directly. */
#define gadget_ring_ptr(name) ((void *)bpf_pseudo_fd(1, -gadget_ring_idx_##name))

/* A record of `size` bytes in ring `name`, or NULL (counted as lost) when the ring is full. */
#define gadget_reserve(name, size)                                            \
	({                                                                    \
		void *__r = bpf_ringbuf_reserve(gadget_ring_ptr(name), size, 0); \
		if (!__r)                                                     \
			gadget_count_lost(gadget_ring_idx_##name);            \
		__r;                                                          \
	})

/* Submits without waking the reader, unless the ring is filling up. */
#define gadget_submit(name, ptr)                                                        \
	bpf_ringbuf_submit(ptr, bpf_ringbuf_query(gadget_ring_ptr(name), BPF_RB_AVAIL_DATA) >= \
					GADGET_WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP)

#endif
