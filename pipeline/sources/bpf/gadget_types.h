/* Process context shared by every gadget, in the upstream Inspektor Gadget layout.
 *
 * bcc compiles against Debian's kernel headers, which trail the running kernel, so the
 * task_struct (and friends) they declare has the wrong layout.  Nothing here dereferences a
 * kernel struct through a header definition: the offsets come from the running kernel's BTF as
 * GADGET_OFF_* macros (pipeline.sources.btf.gadget_cflags()), and memory is read with
 * bpf_probe_read_kernel() at base + offset, with addresses kept as plain u64.  Keeping them as
 * integers also keeps bcc's rewriter, which turns "->" on pointers it believes are kernel
 * pointers into probe reads, away from this code.
 *
 * Required macros: GADGET_OFF_TASK_PID, _TGID, _COMM, _REAL_PARENT, _NSPROXY,
 * GADGET_OFF_NSPROXY_MNT_NS, GADGET_OFF_MNT_NS_INUM.  Optional (CONFIG_AUDIT):
 * GADGET_OFF_TASK_LOGINUID, GADGET_OFF_TASK_SESSIONID.
 */
#ifndef GADGETPIPE_GADGET_TYPES_H
#define GADGETPIPE_GADGET_TYPES_H

#if !defined(GADGET_OFF_TASK_PID) || !defined(GADGET_OFF_TASK_TGID) || \
    !defined(GADGET_OFF_TASK_COMM) || !defined(GADGET_OFF_TASK_REAL_PARENT) || \
    !defined(GADGET_OFF_TASK_NSPROXY) || !defined(GADGET_OFF_NSPROXY_MNT_NS) || \
    !defined(GADGET_OFF_MNT_NS_INUM)
#error "gadget_types.h needs the GADGET_OFF_* offsets: compile with cflags=pipeline.sources.btf.gadget_cflags()"
#endif

#define GADGET_COMM_LEN 16

struct gadget_creds {
	__u32 uid;
	__u32 gid;
};

struct gadget_parent {
	char comm[GADGET_COMM_LEN];
	__u32 pid; /* tgid of task->real_parent */
	__u32 tid; /* pid (thread id) of task->real_parent */
};

struct gadget_process {
	char comm[GADGET_COMM_LEN];
	__u32 pid; /* tgid, as user space calls a process id */
	__u32 tid;
	__u64 mntns_id;
	struct gadget_creds creds;
	struct gadget_parent parent;
};

/* User space decodes these structs by these exact offsets (and fills every byte, so no holes). */
_Static_assert(__builtin_offsetof(struct gadget_process, pid) == 16, "gadget_process.pid");
_Static_assert(__builtin_offsetof(struct gadget_process, tid) == 20, "gadget_process.tid");
_Static_assert(__builtin_offsetof(struct gadget_process, mntns_id) == 24, "gadget_process.mntns_id");
_Static_assert(__builtin_offsetof(struct gadget_process, creds) == 32, "gadget_process.creds");
_Static_assert(__builtin_offsetof(struct gadget_process, parent) == 40, "gadget_process.parent");
_Static_assert(sizeof(struct gadget_process) == 64, "sizeof(struct gadget_process)");

/* The word at kernel address base + off, or 0 when base is NULL or the read faults. */
static __always_inline __u64 gadget_read_u64(__u64 base, __u64 off)
{
	__u64 v = 0;

	if (base)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline __u32 gadget_read_u32(__u64 base, __u64 off)
{
	__u32 v = 0;

	if (base)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

/* task->nsproxy->mnt_ns->ns.inum; 0 once the task has dropped its namespaces (late in exit). */
static __always_inline __u64 gadget_task_mntns_id(__u64 task)
{
	__u64 nsproxy = gadget_read_u64(task, GADGET_OFF_TASK_NSPROXY);
	__u64 mnt_ns = gadget_read_u64(nsproxy, GADGET_OFF_NSPROXY_MNT_NS);

	return gadget_read_u32(mnt_ns, GADGET_OFF_MNT_NS_INUM);
}

/* Mount namespace id (the inode number of /proc/<pid>/ns/mnt) of the current task. */
static __always_inline __u64 gadget_get_mntns_id(void)
{
	return gadget_task_mntns_id(bpf_get_current_task());
}

/* task->loginuid.val (audit login uid); (u32)-1, the kernel's "unset" value, without CONFIG_AUDIT. */
static __always_inline __u32 gadget_loginuid(void)
{
#ifdef GADGET_OFF_TASK_LOGINUID
	__u64 task = bpf_get_current_task();
	__u32 v = (__u32)-1;

	if (task)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(task + GADGET_OFF_TASK_LOGINUID));
	return v;
#else
	return (__u32)-1;
#endif
}

/* task->sessionid (audit session id); (u32)-1, the kernel's "unset" value, without CONFIG_AUDIT. */
static __always_inline __u32 gadget_sessionid(void)
{
#ifdef GADGET_OFF_TASK_SESSIONID
	__u64 task = bpf_get_current_task();
	__u32 v = (__u32)-1;

	if (task)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(task + GADGET_OFF_TASK_SESSIONID));
	return v;
#else
	return (__u32)-1;
#endif
}

/* Fill every field of *p for the current task.  Ids are as seen from the initial pid namespace. */
static __always_inline void gadget_process_populate(struct gadget_process *p)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u64 task = bpf_get_current_task();
	__u64 parent = gadget_read_u64(task, GADGET_OFF_TASK_REAL_PARENT);

	bpf_get_current_comm(p->comm, sizeof(p->comm));
	p->pid = pid_tgid >> 32;
	p->tid = (__u32)pid_tgid;
	p->mntns_id = gadget_task_mntns_id(task);
	p->creds.uid = (__u32)uid_gid;
	p->creds.gid = uid_gid >> 32;

	/* A failed read zeroes its destination, so a vanished parent leaves zeros, not garbage. */
	__builtin_memset(p->parent.comm, 0, sizeof(p->parent.comm));
	if (parent)
		bpf_probe_read_kernel(p->parent.comm, sizeof(p->parent.comm),
				      (void *)(parent + GADGET_OFF_TASK_COMM));
	p->parent.pid = gadget_read_u32(parent, GADGET_OFF_TASK_TGID);
	p->parent.tid = gadget_read_u32(parent, GADGET_OFF_TASK_PID);
}

#endif /* GADGETPIPE_GADGET_TYPES_H */
