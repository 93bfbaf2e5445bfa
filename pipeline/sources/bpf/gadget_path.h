/* The absolute path of an open file, built in the kernel by walking its dentries and mounts, as
 * upstream Inspektor Gadget's include/gadget/filesystem.h (get_path_str) does. bpf_d_path()
 * would be simpler, but the kernel allows it only in some fentry/LSM programs, not tracepoints.
 *
 * Offsets come from the running kernel's BTF (pipeline.sources.btf): the struct definitions in
 * the kernel headers bcc compiles against may not match the running kernel, and struct mount
 * is private to fs/ anyway.
 *
 * The path is written backwards from the middle of a per-CPU scratch buffer, one component per
 * iteration, crossing to the parent mount at each mount root, up to the root of the task's
 * mount namespace (a path in a container is relative to the container's root, as upstream's).
 * A file with no dentry chain (memfd, pipes, sockets) gets its dentry name alone.
 */
#ifndef GADGETPIPE_GADGET_PATH_H
#define GADGETPIPE_GADGET_PATH_H

#if !defined(GADGET_OFF_FILE_DENTRY) || !defined(GADGET_OFF_FILE_MNT) || \
    !defined(GADGET_OFF_DENTRY_NAME) || !defined(GADGET_OFF_DENTRY_NAME_LEN) || \
    !defined(GADGET_OFF_DENTRY_PARENT) || !defined(GADGET_OFF_VFSMOUNT_MNT_ROOT) || \
    !defined(GADGET_OFF_MOUNT_MNT) || !defined(GADGET_OFF_MOUNT_PARENT) || \
    !defined(GADGET_OFF_MOUNT_MOUNTPOINT)
#error "gadget_path.h needs the dentry/mount offsets from pipeline.sources.btf"
#endif

#define GADGET_PATH_MAX 512
/* Components walked at most; deeper paths keep their innermost components. */
#define GADGET_PATH_DEPTH 64
/* Scratch: components are written right to left ending at GADGET_PATH_HALF; a component may
 * spill past it only while being read, so twice the room. */
#define GADGET_PATH_HALF 1024
#define GADGET_PATH_NAME_MAX 256 /* NAME_MAX + 1 */

/* The scratch buffer: the program declares a one-entry BPF_PERCPU_ARRAY of it and passes the
 * entry in (bcc rewrites table methods only in the program's own file). */
struct gadget_path_buf {
	char buf[2 * GADGET_PATH_HALF];
	/* The write position lives here, not in a register: loaded from map memory it is an
	 * unknown scalar to the verifier, so the states of different walks compare equal and
	 * are pruned, instead of one verification path per possible path length. */
	__u32 pos;
};

/* Writes the absolute path of `file` (a struct file *) into out[GADGET_PATH_MAX], NUL-ended,
 * using the scratch `s`. Returns the length written (without the NUL), or 0 when nothing could
 * be read. */
static __always_inline int gadget_file_path(__u64 file, struct gadget_path_buf *s, char *out)
{
	if (!s || !file)
		return 0;
	__u64 dentry = gadget_read_u64(file, GADGET_OFF_FILE_DENTRY);
	__u64 vfsmnt = gadget_read_u64(file, GADGET_OFF_FILE_MNT);
	__u64 mnt = vfsmnt - GADGET_OFF_MOUNT_MNT; /* container_of(vfsmnt, struct mount, mnt) */
	__u64 mnt_parent = gadget_read_u64(mnt, GADGET_OFF_MOUNT_PARENT);
	s->pos = GADGET_PATH_HALF; /* the path occupies [pos, GADGET_PATH_HALF) */

	for (int i = 0; i < GADGET_PATH_DEPTH; i++) {
		__u64 mnt_root = gadget_read_u64(vfsmnt, GADGET_OFF_VFSMOUNT_MNT_ROOT);
		__u64 parent = gadget_read_u64(dentry, GADGET_OFF_DENTRY_PARENT);
		if (dentry == mnt_root || dentry == parent) {
			if (dentry != mnt_root)
				break; /* a root that is not its mount's root: unreachable, stop */
			if (mnt == mnt_parent)
				break; /* the namespace's root mount: done */
			/* The root of a mounted file system: continue at its mount point. */
			dentry = gadget_read_u64(mnt, GADGET_OFF_MOUNT_MOUNTPOINT);
			mnt = mnt_parent;
			mnt_parent = gadget_read_u64(mnt, GADGET_OFF_MOUNT_PARENT);
			vfsmnt = mnt + GADGET_OFF_MOUNT_MNT;
			continue;
		}
		__u32 pos = s->pos;
		__u32 len = gadget_read_u32(dentry, GADGET_OFF_DENTRY_NAME_LEN) + 1;
		if (len > GADGET_PATH_NAME_MAX || len + 1 > pos)
			break; /* would not fit: keep what we have */
		__u32 off = pos - len;
		__u64 name = gadget_read_u64(dentry, GADGET_OFF_DENTRY_NAME);
		/* The masks only prove the bounds to the verifier (the checks above already hold);
		 * the empty asm keeps clang from dropping them as redundant. */
		asm volatile("" : "+r"(len), "+r"(off));
		off &= GADGET_PATH_HALF - 1;
		len &= GADGET_PATH_NAME_MAX * 2 - 1;
		int sz = bpf_probe_read_kernel_str(&s->buf[off], len, (void *)name);
		if (sz <= 1)
			break;
		/* The name's NUL becomes the separator before the component written previously. */
		s->buf[(pos - 1) & (2 * GADGET_PATH_HALF - 1)] = '/';
		s->pos = pos - sz;
		dentry = parent;
	}
	__u32 pos = s->pos;
	if (pos == GADGET_PATH_HALF) {
		/* No component: an anonymous file (pipe, socket, memfd): its dentry name alone. */
		__u64 name = gadget_read_u64(dentry, GADGET_OFF_DENTRY_NAME);
		int n = name ? bpf_probe_read_kernel_str(out, GADGET_PATH_MAX, (void *)name) : 0;
		return n > 0 ? n - 1 : 0;
	}
	/* A leading slash, and the trailing separator becomes the end of the string. */
	pos -= 1;
	s->buf[pos & (2 * GADGET_PATH_HALF - 1)] = '/';
	s->buf[GADGET_PATH_HALF - 1] = 0;
	__u32 total = GADGET_PATH_HALF - pos; /* with the NUL */
	if (total > GADGET_PATH_MAX) {
		/* Too long: keep the tail, which names the file. */
		pos = GADGET_PATH_HALF - GADGET_PATH_MAX;
	}
	int n = bpf_probe_read_kernel_str(out, GADGET_PATH_MAX,
					  &s->buf[pos & (2 * GADGET_PATH_HALF - 1)]);
	return n > 0 ? n - 1 : 0;
}

#endif /* GADGETPIPE_GADGET_PATH_H */
