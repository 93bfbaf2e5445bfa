/* Ring buffers for gadget records, read by pipeline/sources/ringbuf.py in whole batches.
 *
 * Wake-ups, not reads, are what a record costs user space: a wake-up per record means a Python
 * call per record. So records are submitted with BPF_RB_NO_WAKEUP and the reader drains on a
 * timer; only once the unread data reaches GADGET_WAKEUP_BYTES does a submit force a wake-up,
 * so that a burst is drained before the ring overflows. Below that level the map fd stays quiet
 * under epoll (poll() and select() still report it readable whenever it holds data).
 *
 * Usage, in a program compiled by bcc with -I<this directory>:
 *
 *     GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);  // the program's first table
 *     #include "gadget_lost.h"                        // gadget_lost: the next table
 *     ...
 *     struct event *e = gadget_reserve(events, sizeof(*e));
 *     if (!e)
 *             return 0;                               // already counted in gadget_lost
 *     ...
 *     gadget_submit(events, e);                       // or gadget_discard(events, e)
 *
 * Why rings come first, numbered: bcc only rewrites table methods (events.foo(...)) written in
 * the program's own file and outside macros, and never rewrites "&events", so these helpers
 * cannot name a ring. They use bcc's placeholder instead: each table declaration gets the fake
 * fd -1, -2, -3, ... in declaration order (after preprocessing, so tables declared by included
 * headers and macros count where they expand; BPF_TABLE("extern", ...) and the re-declarations
 * made by the *_SHARED / *_PUBLIC macros take none), and once the maps exist bcc replaces
 * bpf_pseudo_fd(1, -N) with the N-th table's real fd. (Checked on bcc 0.26: with the ring
 * declared second, -2 reaches it; see tests/e2e/test_ringbuf.py.) GADGET_RINGBUF's index is
 * that N. A wrong index names another map, and the verifier refuses the program ("cannot pass
 * map_type ... into func bpf_ringbuf_reserve"), or bcc a bad fd: it never writes elsewhere.
 * A program with several rings declares them as tables 1..R, defines GADGET_NUM_RINGS=R
 * before including gadget_lost.h, and user space reads loss counts per ring (index - 1).
 * gadget_lost is table R+1; with load shedding compiled in (GADGET_SHED), gadget_sample and
 * gadget_shed are R+2 and R+3 (gadget_sample.h), so the program's own tables come after them.
 */
#ifndef GADGETPIPE_GADGET_RINGBUF_H
#define GADGETPIPE_GADGET_RINGBUF_H

#ifndef GADGET_RING_PAGES
#define GADGET_RING_PAGES 2048
#endif
#define GADGET_MAX_RINGS 8

#define GADGET_RINGBUF(name, pages, idx) \
	BPF_RINGBUF_OUTPUT(name, pages);     \
	enum { gadget_ring_idx_##name = (idx) }

/* Must stay a constant expression: it becomes the immediate of a BPF_LD_IMM64 instruction. */
#define gadget_ring_ptr(name) ((void *)bpf_pseudo_fd(1, -gadget_ring_idx_##name))

/* The fill level, in unread bytes, from which a submit wakes the reader: set it with
 * -DGADGET_WAKEUP_BYTES=...; by default a quarter of the ring, asked from the kernel so that it
 * holds whatever pages the ring was declared with. */
#ifdef GADGET_WAKEUP_BYTES
#define gadget_wakeup_bytes(name) ((__u64)(GADGET_WAKEUP_BYTES))
#else
#define gadget_wakeup_bytes(name) \
	(bpf_ringbuf_query(gadget_ring_ptr(name), BPF_RB_RING_SIZE) / 4)
#endif

#define gadget_wakeup_flags(name)                                                  \
	(bpf_ringbuf_query(gadget_ring_ptr(name), BPF_RB_AVAIL_DATA) >=            \
			 gadget_wakeup_bytes(name) ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP)

/* A record of `size` bytes (a constant: the verifier requires it) in ring `name`, or NULL:
 * when the ring is full (counted in gadget_lost), or when load shedding samples the record out
 * (counted in gadget_shed; see gadget_sample.h, a no-op unless compiled with GADGET_SHED). */
#define gadget_reserve(name, size)                                                    \
	({                                                                            \
		void *__gadget_rec = 0;                                               \
		if (gadget_keep(gadget_ring_idx_##name)) {                            \
			__gadget_rec = bpf_ringbuf_reserve(gadget_ring_ptr(name), (size), 0); \
			if (!__gadget_rec)                                            \
				gadget_count_lost(gadget_ring_idx_##name);            \
		}                                                                     \
		__gadget_rec;                                                         \
	})

/* The producer position already counts the reserved record, so the fill level includes it. */
#define gadget_submit(name, ptr) bpf_ringbuf_submit((ptr), gadget_wakeup_flags(name))

/* A discarded record only tells the reader to skip it: no reason to wake anyone. */
#define gadget_discard(name, ptr) bpf_ringbuf_discard((ptr), BPF_RB_NO_WAKEUP)

/* Copies `size` bytes (which may vary, within a bound the verifier can see) into ring `name`:
 * the way to write variable-size records, since a reserve needs a constant size. Evaluates to
 * 0 or a negative error; a failure is counted in gadget_lost. */
#define gadget_output(name, data, size)                                                \
	({                                                                             \
		long __gadget_err = bpf_ringbuf_output(gadget_ring_ptr(name), (data), (size), \
						       gadget_wakeup_flags(name));    \
		if (__gadget_err)                                                      \
			gadget_count_lost(gadget_ring_idx_##name);                     \
		__gadget_err;                                                          \
	})

#endif
