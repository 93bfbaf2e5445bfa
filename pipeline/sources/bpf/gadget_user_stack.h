/* struct gadget_user_stack: what identifies a user stack for symbolisation, in upstream
 * Inspektor Gadget's layout (include/gadget/types.h, user_stack_map.h), filled from the
 * current task at offsets taken from the running kernel's BTF (pipeline.sources.btf).
 *
 * The stack id comes from a BPF_STACK_TRACE table the program declares and queries itself
 * (bcc rewrites table methods only in the program's own file) with
 * `table.get_stackid(ctx, BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP)`; gadget_user_stack_fill()
 * fills the rest. A zeroed struct means "not collected", as upstream's.
 *
 * Not filled: otel_correlation_id (upstream's OpenTelemetry profiler hook) is 0.
 */
#ifndef GADGETPIPE_GADGET_USER_STACK_H
#define GADGETPIPE_GADGET_USER_STACK_H

#if !defined(GADGET_OFF_TASK_MM) || !defined(GADGET_OFF_MM_EXE_FILE) || \
    !defined(GADGET_OFF_MM_START_CODE) || !defined(GADGET_OFF_MM_START_STACK) || \
    !defined(GADGET_OFF_FILE_INODE) || !defined(GADGET_OFF_INODE_INO) || \
    !defined(GADGET_OFF_INODE_SB) || !defined(GADGET_OFF_SB_DEV) || \
    !defined(GADGET_OFF_TASK_THREAD_PID) || !defined(GADGET_OFF_PID_LEVEL) || \
    !defined(GADGET_OFF_PID_NUMBERS) || !defined(GADGET_OFF_UPID_NR) || \
    !defined(GADGET_OFF_UPID_NS) || !defined(GADGET_OFF_PID_NS_INUM) || \
    !defined(GADGET_SIZE_UPID)
#error "gadget_user_stack.h needs the mm/inode/pid offsets from pipeline.sources.btf"
#endif

struct gadget_user_stack {
	/* The executable: device (major, minor of the kernel dev_t), inode and mtime. */
	__u32 major;
	__u32 minor;
	__u64 inode;
	__u64 mtime_sec;
	__u32 mtime_nsec;
	/* FNV-1a of (mm, mm->start_code, mm->start_stack): changes with each execve. */
	__u32 base_addr_hash;
	__u32 stack_id;
	/* Ids in the initial pid namespace (level 0) and in the next one (level 1, 0 if none). */
	__u32 tgid_level0;
	__u32 pid_level0;
	__u32 pidns_level0;
	__u32 pid_level1;
	__u32 pidns_level1;
	__u64 otel_correlation_id;
	/* bpf_ktime_get_boot_ns() when the stack was taken. */
	__u64 boot_timestamp;
};

_Static_assert(sizeof(struct gadget_user_stack) == 72, "sizeof(struct gadget_user_stack)");

static __always_inline void gadget_fnv32a_u64(__u32 *hash, __u64 v)
{
	for (int i = 0; i < 8; i++) {
		*hash ^= (v >> (i * 8)) & 0xff;
		*hash *= 0x01000193;
	}
}

/* Fills *u for the current task; stack_id is the caller's get_stackid() result (negative:
 * the stack could not be taken, stored as is, as upstream does). */
static __always_inline void gadget_user_stack_fill(struct gadget_user_stack *u, long stack_id)
{
	__u64 task = bpf_get_current_task();
	__u64 mm = gadget_read_u64(task, GADGET_OFF_TASK_MM);
	__u64 exe = gadget_read_u64(mm, GADGET_OFF_MM_EXE_FILE);
	__u64 inode = gadget_read_u64(exe, GADGET_OFF_FILE_INODE);
	__u32 dev = gadget_read_u32(gadget_read_u64(inode, GADGET_OFF_INODE_SB), GADGET_OFF_SB_DEV);

	u->stack_id = (__u32)stack_id;
	u->boot_timestamp = bpf_ktime_get_boot_ns();
	u->major = dev >> 20;
	u->minor = dev & ((1U << 20) - 1);
	u->inode = gadget_read_u64(inode, GADGET_OFF_INODE_INO);
#if defined(GADGET_OFF_INODE_MTIME_SEC) && defined(GADGET_OFF_INODE_MTIME_NSEC)
	u->mtime_sec = gadget_read_u64(inode, GADGET_OFF_INODE_MTIME_SEC);
	u->mtime_nsec = gadget_read_u32(inode, GADGET_OFF_INODE_MTIME_NSEC);
#else
	u->mtime_sec = 0; /* kernels before 6.11 keep the mtime elsewhere: not read */
	u->mtime_nsec = 0;
#endif
	__u32 hash = 0x811c9dc5;
	gadget_fnv32a_u64(&hash, mm);
	gadget_fnv32a_u64(&hash, gadget_read_u64(mm, GADGET_OFF_MM_START_CODE));
	gadget_fnv32a_u64(&hash, gadget_read_u64(mm, GADGET_OFF_MM_START_STACK));
	u->base_addr_hash = hash;

	__u64 pid = gadget_read_u64(task, GADGET_OFF_TASK_THREAD_PID);
	__u32 level = gadget_read_u32(pid, GADGET_OFF_PID_LEVEL);
	__u64 numbers = pid + GADGET_OFF_PID_NUMBERS;
	u->tgid_level0 = bpf_get_current_pid_tgid() >> 32;
	u->pid_level0 = gadget_read_u32(numbers, GADGET_OFF_UPID_NR);
	u->pidns_level0 = gadget_read_u32(gadget_read_u64(numbers, GADGET_OFF_UPID_NS),
					  GADGET_OFF_PID_NS_INUM);
	if (pid && level >= 1) {
		numbers += GADGET_SIZE_UPID;
		u->pid_level1 = gadget_read_u32(numbers, GADGET_OFF_UPID_NR);
		u->pidns_level1 = gadget_read_u32(gadget_read_u64(numbers, GADGET_OFF_UPID_NS),
						  GADGET_OFF_PID_NS_INUM);
	} else {
		u->pid_level1 = 0;
		u->pidns_level1 = 0;
	}
	u->otel_correlation_id = 0;
}

#endif /* GADGETPIPE_GADGET_USER_STACK_H */
