/* What upstream's trace_exec reads about executables, files and terminals, at offsets from the
 * running kernel's BTF (pipeline/sources/btf.py) instead of CO-RE: a task's executable file and
 * root mount, an inode's change time, device and whether it sits in an overlay's upper layer,
 * the controlling terminal. No kprobe: these are plain reads of kernel memory.
 */
#ifndef GADGETPIPE_GADGET_EXE_H
#define GADGETPIPE_GADGET_EXE_H

#if !defined(GADGET_OFF_TASK_MM) || !defined(GADGET_OFF_MM_EXE_FILE) || \
    !defined(GADGET_OFF_FILE_INODE) || !defined(GADGET_OFF_FILE_PATH) || \
    !defined(GADGET_OFF_PATH_MNT) || !defined(GADGET_OFF_TASK_FS) || \
    !defined(GADGET_OFF_FS_ROOT) || !defined(GADGET_OFF_FS_PWD) || \
    !defined(GADGET_OFF_INODE_SB) || !defined(GADGET_OFF_SB_MAGIC) || \
    !defined(GADGET_OFF_SB_DEV) || !defined(GADGET_OFF_INODE_INO) || \
    !defined(GADGET_OFF_INODE_CTIME_SEC) || !defined(GADGET_OFF_INODE_CTIME_NSEC) || \
    !defined(GADGET_SIZE_INODE) || !defined(GADGET_OFF_TASK_SIGNAL) || \
    !defined(GADGET_OFF_SIGNAL_TTY) || !defined(GADGET_OFF_TTY_INDEX) || \
    !defined(GADGET_OFF_TTY_DRIVER) || !defined(GADGET_OFF_TTY_DRIVER_MAJOR) || \
    !defined(GADGET_OFF_TTY_DRIVER_MINOR_START)
#error "gadget_exe.h needs the mm, file, inode, fs and tty offsets of the running kernel's BTF"
#endif

#define GADGET_OVERLAYFS_SUPER_MAGIC 0x794c7630
/* Since 6.11 the kernel keeps a flag in the top bit of i_ctime_nsec (I_CTIME_QUERIED). */
#define GADGET_I_CTIME_QUERIED (1U << 31)
#define GADGET_MINORBITS 20

/* task->mm->exe_file, or 0 (a kernel thread, an exiting task). */
static __always_inline __u64 gadget_task_exe_file(__u64 task)
{
	return gadget_read_u64(gadget_read_u64(task, GADGET_OFF_TASK_MM), GADGET_OFF_MM_EXE_FILE);
}

static __always_inline __u64 gadget_file_inode(__u64 file)
{
	return gadget_read_u64(file, GADGET_OFF_FILE_INODE);
}

/* The inode's change time in ns since the epoch, as stat() shows it (upstream's
 * gadget_get_ctime_nanosec_from_inode). */
static __always_inline __u64 gadget_inode_ctime(__u64 inode)
{
	if (!inode)
		return 0;
	__s64 sec = (__s64)gadget_read_u64(inode, GADGET_OFF_INODE_CTIME_SEC);
	__u32 nsec = gadget_read_u32(inode, GADGET_OFF_INODE_CTIME_NSEC) & ~GADGET_I_CTIME_QUERIED;

	return sec < 0 ? 0 : (__u64)sec * 1000000000ULL + nsec;
}

/* Whether the inode is an overlayfs inode whose file is in the upper layer: the ovl_inode
 * that embeds it has an upper dentry right after the VFS inode (upstream's has_upper_layer). */
static __always_inline bool gadget_inode_upper_layer(__u64 inode)
{
	__u64 sb = gadget_read_u64(inode, GADGET_OFF_INODE_SB);

	if (!sb || gadget_read_u64(sb, GADGET_OFF_SB_MAGIC) != GADGET_OVERLAYFS_SUPER_MAGIC)
		return false;
	return gadget_read_u64(inode, GADGET_SIZE_INODE) != 0;
}

/* The device (major, minor) of the inode's file system and its inode number. */
static __always_inline void gadget_inode_id(__u64 inode, __u32 *major, __u32 *minor, __u64 *ino)
{
	__u32 dev = gadget_read_u32(gadget_read_u64(inode, GADGET_OFF_INODE_SB), GADGET_OFF_SB_DEV);

	*major = dev >> GADGET_MINORBITS;
	*minor = dev & ((1U << GADGET_MINORBITS) - 1);
	*ino = gadget_read_u64(inode, GADGET_OFF_INODE_INO);
}

/* Whether the file is on the task's root mount (upstream's is_from_rootfs: in a container,
 * from the container's image rather than a volume). */
static __always_inline bool gadget_file_from_rootfs(__u64 task, __u64 file)
{
	__u64 fs = gadget_read_u64(task, GADGET_OFF_TASK_FS);
	__u64 root_mnt = gadget_read_u64(fs, GADGET_OFF_FS_ROOT + GADGET_OFF_PATH_MNT);

	return file && root_mnt && gadget_read_u64(file, GADGET_OFF_FILE_PATH + GADGET_OFF_PATH_MNT)
		== root_mnt;
}

/* The `struct path` of the task's working directory (an address, for gadget_path_of). */
static __always_inline __u64 gadget_task_pwd(__u64 task)
{
	__u64 fs = gadget_read_u64(task, GADGET_OFF_TASK_FS);

	return fs ? fs + GADGET_OFF_FS_PWD : 0;
}

/* The controlling terminal: its index within its driver, and its device numbers; zeros
 * without one (upstream's read_tty). */
static __always_inline void gadget_task_tty(__u64 task, __s32 *index, __u32 *major, __u32 *minor)
{
	__u64 tty = gadget_read_u64(gadget_read_u64(task, GADGET_OFF_TASK_SIGNAL),
				    GADGET_OFF_SIGNAL_TTY);
	__u64 driver = gadget_read_u64(tty, GADGET_OFF_TTY_DRIVER);

	if (!tty || !driver)
		return;
	*index = (__s32)gadget_read_u32(tty, GADGET_OFF_TTY_INDEX);
	*major = gadget_read_u32(driver, GADGET_OFF_TTY_DRIVER_MAJOR);
	*minor = gadget_read_u32(driver, GADGET_OFF_TTY_DRIVER_MINOR_START) + *index;
}

#endif /* GADGETPIPE_GADGET_EXE_H */
