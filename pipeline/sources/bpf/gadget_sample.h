/* In-kernel load shedding (operator.bcc.shed), included by gadget_lost.h.
 *
 * With -DGADGET_SHED=1 (the tracer adds it when the run asks for shedding) every gadget_reserve
 * first asks gadget_keep(): user space writes a sampling rate N per ring into gadget_sample
 * (0 or 1: keep every record) and a record is kept with probability 1/N (bpf_get_prandom_u32,
 * so no shared state is written on the hot path); a record not kept is never reserved and is
 * counted, per CPU, in gadget_shed, which user space reads into the ledger (stage kernel,
 * reason shed). Without GADGET_SHED, gadget_keep() is the constant 1 and no table is declared:
 * a run that does not shed compiles to exactly what it did before.
 *
 * Table order (see gadget_ringbuf.h): rings are tables 1..R, gadget_lost is R+1, and these two
 * follow it, R+2 and R+3; like gadget_lost they are reached through their pseudo fds, because
 * bcc does not rewrite map methods written in headers. Only gadget_reserve sheds:
 * gadget_output (variable-size records, trace_dns) never does.
 */
#ifndef GADGETPIPE_GADGET_SAMPLE_H
#define GADGETPIPE_GADGET_SAMPLE_H

#ifdef GADGET_SHED
BPF_ARRAY(gadget_sample, __u32, GADGET_MAX_RINGS);      /* table R+2: N per ring (index - 1) */
BPF_PERCPU_ARRAY(gadget_shed, __u64, GADGET_MAX_RINGS); /* table R+3: records shed per ring */

static __always_inline int gadget_keep(__u32 ring_idx)
{
	__u32 key = ring_idx - 1;
	__u32 *rate = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -(GADGET_NUM_RINGS + 2)), &key);
	__u32 n = rate ? *rate : 1; /* one load: user space may change it meanwhile */

	if (n <= 1 || bpf_get_prandom_u32() % n == 0)
		return 1;
	__u64 *shed = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -(GADGET_NUM_RINGS + 3)), &key);
	if (shed)
		__sync_fetch_and_add(shed, 1); /* a nested program on this CPU may count too */
	return 0;
}
#else
#define gadget_keep(ring_idx) 1
#endif

#endif
