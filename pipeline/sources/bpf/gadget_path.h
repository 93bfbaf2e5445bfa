/* Full paths of kernel `struct path`s (a file's f_path, a task's cwd), as upstream's
 * get_path_str() (include/gadget/filesystem.h) builds them: walk the dentries up to the mount's
 * root, cross to the parent mount at mount points, up to the root of the task's mount
 * namespace, writing the names backwards into a per-CPU scratch buffer. bpf_d_path() would be
 * simpler, but the kernel allows it only in some fentry/LSM programs, not tracepoints. Kernel
 * memory is read at offsets from the running kernel's BTF (pipeline/sources/btf.py; struct
 * mount is private to fs/, but in BTF), like gadget_types.h does.
 *
 * The program declares the scratch buffer (bcc rewrites table methods only in the program's own
 * file, and wants the ring buffer declared first) and hands it in:
 *
 *     BPF_PERCPU_ARRAY(path_scratch, struct gadget_path_buf, 1);
 *     ...
 *     gadget_path_of_fd(path_scratch.lookup(&zero), fd, e->fpath, sizeof(e->fpath));
 * Needs GADGET_OFF_{PATH_MNT,PATH_DENTRY,DENTRY_PARENT,DENTRY_NAME,DENTRY_NAME_LEN,
 * VFSMOUNT_MNT_ROOT,MOUNT_MNT,MOUNT_PARENT,MOUNT_MOUNTPOINT}.
 */
#ifndef GADGETPIPE_GADGET_PATH_H
#define GADGETPIPE_GADGET_PATH_H

#if !defined(GADGET_OFF_PATH_MNT) || !defined(GADGET_OFF_PATH_DENTRY) || \
    !defined(GADGET_OFF_DENTRY_PARENT) || !defined(GADGET_OFF_DENTRY_NAME) || \
    !defined(GADGET_OFF_DENTRY_NAME_LEN) || !defined(GADGET_OFF_VFSMOUNT_MNT_ROOT) || \
    !defined(GADGET_OFF_MOUNT_MNT) || !defined(GADGET_OFF_MOUNT_PARENT) || \
    !defined(GADGET_OFF_MOUNT_MOUNTPOINT)
#error "gadget_path.h needs the path offsets of the running kernel's BTF (vfs path members)"
#endif

/* Upstream's GADGET_PATH_MAX: the size of every path field. */
#define GADGET_PATH_MAX 512
/* Path components walked, mount crossings included (upstream: 80); a deeper path keeps its
 * last components. */
#define GADGET_PATH_COMPONENTS 80
/* The path is built backwards, ending at GADGET_PATH_END of the scratch buffer. */
#define GADGET_PATH_END 4096
#define GADGET_PATH_MASK 4095
#define GADGET_NAME_MASK 255

struct gadget_path_buf {
	/* The walk's state lives here, not in registers: the verifier then sees the same state
	 * at the top of every iteration whichever way the last one went (a mount crossed or a
	 * name added) and prunes, instead of exploring each combination (exponential). */
	__u64 dentry;
	__u64 vfsmnt;
	__u64 mnt;
	__u64 mnt_parent;
	__u32 pos;
	__u32 done;
	/* GADGET_PATH_END + 1 for the NUL, + 256: a masked write of up to 255 bytes stays inside
	 * whatever offset the verifier assumes. */
	char buf[GADGET_PATH_END + 1 + 256];
};

/* Writes the full path of the `struct path` at kernel address `path` into out (NUL-terminated,
 * truncated to size), using the scratch buffer s. Returns the length written (with the NUL),
 * or <= 0 when none. */
static __always_inline long gadget_path_of(struct gadget_path_buf *s, __u64 path,
					   char *out, __u32 size)
{
	if (!s || !path)
		return -1;
	s->vfsmnt = gadget_read_u64(path, GADGET_OFF_PATH_MNT);
	s->dentry = gadget_read_u64(path, GADGET_OFF_PATH_DENTRY);
	if (!s->vfsmnt || !s->dentry)
		return -1;
	s->mnt = s->vfsmnt - GADGET_OFF_MOUNT_MNT; /* container_of(vfsmnt, struct mount, mnt) */
	s->mnt_parent = gadget_read_u64(s->mnt, GADGET_OFF_MOUNT_PARENT);
	s->pos = GADGET_PATH_END;
	s->done = 0;
	s->buf[GADGET_PATH_END] = 0;
	/* Not unrolled: unrolled, clang keeps the helpers' addresses in registers and emits
	 * indirect calls the verifier refuses ("unknown opcode 8d"). */
#pragma clang loop unroll(disable)
	for (int i = 0; i < GADGET_PATH_COMPONENTS; i++) {
		if (s->done)
			break;
		__u64 dentry = s->dentry;
		__u64 mnt_root = gadget_read_u64(s->vfsmnt, GADGET_OFF_VFSMOUNT_MNT_ROOT);
		__u64 parent = gadget_read_u64(dentry, GADGET_OFF_DENTRY_PARENT);

		if (dentry == mnt_root || dentry == parent) {
			if (dentry == mnt_root && s->mnt != s->mnt_parent) {
				/* A mount's root: go on from where it is mounted. */
				__u64 mnt = s->mnt_parent;

				s->dentry = gadget_read_u64(s->mnt, GADGET_OFF_MOUNT_MOUNTPOINT);
				s->mnt = mnt;
				s->mnt_parent = gadget_read_u64(mnt, GADGET_OFF_MOUNT_PARENT);
				s->vfsmnt = mnt + GADGET_OFF_MOUNT_MNT;
			} else {
				s->done = 1; /* the global root, or a root that is no mount's */
			}
			continue;
		}
		__u32 len = gadget_read_u32(dentry, GADGET_OFF_DENTRY_NAME_LEN) & GADGET_NAME_MASK;
		__u64 name = gadget_read_u64(dentry, GADGET_OFF_DENTRY_NAME);
		__u32 pos = s->pos;

		if (len == 0 || len + 1 > pos) {
			s->done = 1;
			continue;
		}
		pos -= len + 1;
		/* "/" then the name, in front of what is already there. */
		s->buf[pos & GADGET_PATH_MASK] = '/';
		bpf_probe_read_kernel(&s->buf[(pos + 1) & GADGET_PATH_MASK], len, (void *)name);
		s->pos = pos;
		s->dentry = parent;
	}
	if (s->pos == GADGET_PATH_END) {
		/* The root itself ("/"), or a file outside any mount tree (memfd, pipe): its name. */
		__u64 name = gadget_read_u64(s->dentry, GADGET_OFF_DENTRY_NAME);
		return bpf_probe_read_kernel_str(out, size, (void *)name);
	}
	return bpf_probe_read_kernel_str(out, size, &s->buf[s->pos & GADGET_PATH_MASK]);
}

#if defined(GADGET_OFF_TASK_FILES) && defined(GADGET_OFF_FILES_FDT) && \
    defined(GADGET_OFF_FDTABLE_FD) && defined(GADGET_OFF_FDTABLE_MAX_FDS) && \
    defined(GADGET_OFF_FILE_PATH)
/* The struct file of the current task's descriptor fd, or 0. */
static __always_inline __u64 gadget_file_of_fd(__u32 fd)
{
	__u64 task = bpf_get_current_task();
	__u64 files = gadget_read_u64(task, GADGET_OFF_TASK_FILES);
	__u64 fdt = gadget_read_u64(files, GADGET_OFF_FILES_FDT);

	if (!fdt || fd >= gadget_read_u32(fdt, GADGET_OFF_FDTABLE_MAX_FDS))
		return 0;
	return gadget_read_u64(gadget_read_u64(fdt, GADGET_OFF_FDTABLE_FD), (__u64)fd * 8);
}

/* The full path of the current task's descriptor fd (upstream's
 * read_full_path_of_open_file_fd). */
static __always_inline long gadget_path_of_fd(struct gadget_path_buf *s, __u32 fd,
					      char *out, __u32 size)
{
	__u64 file = gadget_file_of_fd(fd);

	return file ? gadget_path_of(s, file + GADGET_OFF_FILE_PATH, out, size) : -1;
}
#endif

#if defined(GADGET_OFF_FILE_PATH)
/* The absolute path of `file` (a struct file *) in out[GADGET_PATH_MAX]; its length without
 * the NUL, or 0 when none could be read. */
static __always_inline int gadget_file_path(__u64 file, struct gadget_path_buf *s, char *out)
{
	long n = file ? gadget_path_of(s, file + GADGET_OFF_FILE_PATH, out, GADGET_PATH_MAX) : 0;

	if (n <= 0) {
		out[0] = 0;
		return 0;
	}
	return (int)n - 1;
}
#endif

#endif /* GADGETPIPE_GADGET_PATH_H */
