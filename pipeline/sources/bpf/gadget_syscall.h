/* A syscall's arguments at sys_exit, so that a gadget needs one program per syscall instead
 * of an entry program that saves them in a hash map for the exit program to look up and delete.
 *
 * The kernel saves a task's user registers when it enters a syscall and the arguments are still
 * in them when the syscall returns. bpf_task_pt_regs(bpf_get_current_task_btf()) (Linux 5.15)
 * gives their address; the argument registers' offsets come from the running kernel's BTF
 * (pipeline/sources/btf.py, syscall_arg_offsets: x86_64 di, si, dx, r10; arm64 orig_x0, then
 * regs[1..3]), which also defines GADGET_SYSCALL_ARGS_AT_EXIT when both helpers and a known
 * layout exist. Without it a gadget keeps the entry-and-map way (trace_open does both).
 *
 * Measured with bench/kcost.py (trace_open, 200,000 opens of one file, kernel 6.18): the entry
 * program and the map's update, lookup and delete were ~130 of ~350 ns per open.
 */
#ifndef GADGETPIPE_GADGET_SYSCALL_H
#define GADGETPIPE_GADGET_SYSCALL_H

#ifdef GADGET_SYSCALL_ARGS_AT_EXIT
#include "gadget_types.h"

/* The address of the current task's saved user registers (a kernel address, read with
 * probe reads: bcc knows nothing of its BTF type). */
static __always_inline __u64 gadget_syscall_regs(void)
{
	return (__u64)bpf_task_pt_regs(bpf_get_current_task_btf());
}

/* Argument n (0..3) of the current syscall, given gadget_syscall_regs(). */
#define gadget_syscall_arg(regs, n) gadget_read_u64((regs), GADGET_OFF_SYSCALL_ARG##n)
#endif

#endif
