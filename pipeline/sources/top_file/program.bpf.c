// top_file: reads and writes per file and thread, counted in the kernel in a hash map that user
// space drains once per interval (hooks.py). Hooks: tracepoints syscalls/sys_enter_* and
// sys_exit_* of read, write, pread64, pwrite64, readv, writev; the fd is saved per thread at
// entry and resolved to its file (task->files->fdt->fd[fd]) when the call returns with a count.
// A file's absolute path is built in the kernel (gadget_path.h) when its entry is created.
#include "gadget.h"
#include "gadget_path.h"
#define GADGET_MNTNS_FILTER_IDX 1  // no ring: the container selection's map is the first table
#include "gadget_containers.h"

#if !defined(GADGET_OFF_TASK_FILES) || !defined(GADGET_OFF_FILES_FDT) || \
    !defined(GADGET_OFF_FDTABLE_FD) || !defined(GADGET_OFF_FDTABLE_MAX_FDS) || \
    !defined(GADGET_OFF_FILE_INODE) || !defined(GADGET_OFF_INODE_INO) || \
    !defined(GADGET_OFF_INODE_MODE) || !defined(GADGET_OFF_INODE_SB) || !defined(GADGET_OFF_SB_DEV)
#error "top_file needs the file/inode offsets from pipeline.sources.btf"
#endif

#ifndef GADGET_ALL_FILES
#define GADGET_ALL_FILES 0
#endif
#ifndef GADGET_MAX_ENTRIES
#define GADGET_MAX_ENTRIES 10240
#endif

#define S_IFMT 0170000
#define S_IFREG 0100000
#define S_IFSOCK 0140000

enum op { OP_READ, OP_WRITE };
// Upstream's enum type (R, S, O); user space names t_raw with these.
enum type { R, S, O };

// Upstream's key and value layouts (payload 0 and payload 1 of each record). __pid_tgid is a
// private member (the "__" prefix keeps it out of the fields), as upstream's.
struct file_id {
    __u64 inode;
    __u32 dev;
    __u64 __pid_tgid;
};

struct file_stat {
    struct gadget_process proc;
    __u64 reads;
    gadget_bytes rbytes_raw;
    __u64 writes;
    gadget_bytes wbytes_raw;
    char file[GADGET_PATH_MAX];
    __u32 t_raw;
};

struct pending {
    __s32 fd;
    __u32 op;
};

BPF_HASH(stats, struct file_id, struct file_stat, GADGET_MAX_ENTRIES);
BPF_HASH(inflight, __u32, struct pending, 10240);
BPF_PERCPU_ARRAY(scratch, struct file_stat, 1);
BPF_PERCPU_ARRAY(path_scratch, struct gadget_path_buf, 1);

static __always_inline int enter(__s64 fd, __u32 op)
{
    if (fd < 0 || gadget_should_discard())
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct pending p = {.fd = (__s32)fd, .op = op};
    inflight.update(&tid, &p);
    return 0;
}

static __always_inline int leave(long ret)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct pending *p = inflight.lookup(&tid);
    if (!p)
        return 0;
    __s32 fd = p->fd;
    __u32 op = p->op;
    inflight.delete(&tid);
    if (ret < 0)
        return 0;

    __u64 task = bpf_get_current_task();
    __u64 files = gadget_read_u64(task, GADGET_OFF_TASK_FILES);
    __u64 fdt = gadget_read_u64(files, GADGET_OFF_FILES_FDT);
    if ((__u32)fd >= gadget_read_u32(fdt, GADGET_OFF_FDTABLE_MAX_FDS))
        return 0;
    __u64 fd_array = gadget_read_u64(fdt, GADGET_OFF_FDTABLE_FD);
    __u64 file = gadget_read_u64(fd_array, (__u64)fd * 8);
    __u64 inode = gadget_read_u64(file, GADGET_OFF_FILE_INODE);
    if (!inode)
        return 0;  // closed by another thread meanwhile
    __u16 mode = 0;
    bpf_probe_read_kernel(&mode, sizeof(mode), (void *)(inode + GADGET_OFF_INODE_MODE));
    if (!GADGET_ALL_FILES && (mode & S_IFMT) != S_IFREG)
        return 0;

    struct file_id key = {};
    key.inode = gadget_read_u64(inode, GADGET_OFF_INODE_INO);
    key.dev = gadget_read_u32(gadget_read_u64(inode, GADGET_OFF_INODE_SB), GADGET_OFF_SB_DEV);
    key.__pid_tgid = bpf_get_current_pid_tgid();
    struct file_stat *v = stats.lookup(&key);
    if (!v) {
        __u32 zero = 0;
        struct file_stat *init = scratch.lookup(&zero);
        if (!init)
            return 0;
        __builtin_memset(init, 0, sizeof(*init));
        gadget_process_populate(&init->proc);
        gadget_file_path(file, path_scratch.lookup(&zero), init->file);
        init->t_raw = (mode & S_IFMT) == S_IFREG ? R : (mode & S_IFMT) == S_IFSOCK ? S : O;
        stats.insert(&key, init);  // a full map drops new files until the next drain
        v = stats.lookup(&key);
        if (!v)
            return 0;
    }
    // Other CPUs may count the same key (threads share a pid_tgid only with themselves, but
    // a drain can race): atomic adds.
    if (op == OP_READ) {
        __sync_fetch_and_add(&v->reads, 1);
        __sync_fetch_and_add(&v->rbytes_raw, (__u64)ret);
    } else {
        __sync_fetch_and_add(&v->writes, 1);
        __sync_fetch_and_add(&v->wbytes_raw, (__u64)ret);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return enter(args->fd, OP_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return leave(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return enter(args->fd, OP_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return leave(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_pread64) { return enter(args->fd, OP_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_pread64) { return leave(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64) { return enter(args->fd, OP_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_pwrite64) { return leave(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return enter(args->fd, OP_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return leave(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return enter(args->fd, OP_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return leave(args->ret); }
