/* In-kernel event filters shared by every gadget, configured by cflags:
 *
 *   -DGADGET_FILTER_PID=<tgid>      -DGADGET_FILTER_TID=<tid>
 *   -DGADGET_FILTER_UID=<uid>       -DGADGET_FILTER_GID=<gid>
 *   -DGADGET_FILTER_COMM="<comm>"   (a string literal; see gadget_filter_comm_differs)
 *   -DGADGET_FILTER_MNTNS=<mount namespace inode>  (also needs the gadget_cflags() offsets)
 *   -DGADGET_FILTER_CONTAINERS=1    (container selection: see gadget_containers.h)
 *
 * gadget_should_discard() is true when the current task fails any configured filter.  Filters
 * are compiled in rather than looked up in maps, so an unset filter costs nothing: with no
 * GADGET_FILTER_* macro the function is a constant false that the compiler drops.  The one
 * map, the container selection's, is declared by gadget_containers.h (gadget_lost.h includes
 * it), which also defines gadget_should_discard() on top of gadget_filter_discard() here.
 * Ids are compared as the kernel's BPF helpers report them (initial pid namespace).
 */
#ifndef GADGETPIPE_GADGET_FILTER_H
#define GADGETPIPE_GADGET_FILTER_H

#ifdef GADGET_FILTER_MNTNS
#include "gadget_types.h"
#endif

#ifdef GADGET_FILTER_COMM
/* Concatenating with "" only compiles when the macro is a string literal, so a filter passed
 * without its quotes (-DGADGET_FILTER_COMM=bash) fails here instead of naming a variable. */
_Static_assert(sizeof("" GADGET_FILTER_COMM "") > 1, "GADGET_FILTER_COMM must be a non-empty string literal");

/* True unless the current comm equals GADGET_FILTER_COMM.  The kernel keeps at most 15
 * characters of a comm, so a longer filter is compared by its first 15, as the comm it names
 * would have been truncated.  The loop is unrolled so every index into the literal is constant
 * and folds away: bcc cannot load programs that read the literal from .rodata. */
static __always_inline bool gadget_filter_comm_differs(void)
{
	char comm[16] = {};

	bpf_get_current_comm(comm, sizeof(comm));
#pragma unroll
	for (int i = 0; i < 15; i++) {
		char want = i < (int)sizeof(GADGET_FILTER_COMM) ? (GADGET_FILTER_COMM)[i] : 0;

		if (comm[i] != want)
			return true;
		if (!want)
			return false;
	}
	return false;
}
#endif

static __always_inline bool gadget_filter_discard(void)
{
#if defined(GADGET_FILTER_PID) || defined(GADGET_FILTER_TID)
	__u64 pid_tgid = bpf_get_current_pid_tgid();
#endif
#if defined(GADGET_FILTER_UID) || defined(GADGET_FILTER_GID)
	__u64 uid_gid = bpf_get_current_uid_gid();
#endif

#ifdef GADGET_FILTER_PID
	if ((__u32)(pid_tgid >> 32) != (__u32)(GADGET_FILTER_PID))
		return true;
#endif
#ifdef GADGET_FILTER_TID
	if ((__u32)pid_tgid != (__u32)(GADGET_FILTER_TID))
		return true;
#endif
#ifdef GADGET_FILTER_UID
	if ((__u32)uid_gid != (__u32)(GADGET_FILTER_UID))
		return true;
#endif
#ifdef GADGET_FILTER_GID
	if ((__u32)(uid_gid >> 32) != (__u32)(GADGET_FILTER_GID))
		return true;
#endif
#ifdef GADGET_FILTER_MNTNS
	if (gadget_get_mntns_id() != (__u64)(GADGET_FILTER_MNTNS))
		return true;
#endif
#ifdef GADGET_FILTER_COMM
	if (gadget_filter_comm_differs())
		return true;
#endif
	return false;
}

#ifndef GADGET_FILTER_CONTAINERS
/* With container selection, gadget_containers.h defines it with the selection map's check. */
#define gadget_should_discard() gadget_filter_discard()
#endif

#endif /* GADGETPIPE_GADGET_FILTER_H */
