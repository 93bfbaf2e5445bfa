// trace_exec: one record per execve/execveat, emitted when the syscall returns so the record
// carries the new image's comm, its executable and the result. Tracepoints only; kernel
// structures are read at offsets from the running kernel's BTF (gadget_exe.h, gadget_path.h).
#include "gadget.h"

#ifndef GADGET_IGNORE_FAILED
#define GADGET_IGNORE_FAILED 1
#endif
#ifndef GADGET_ONLY_FAILED
#define GADGET_ONLY_FAILED 0
#endif
#ifndef GADGET_PATHS
#define GADGET_PATHS 0
#endif

#define ARGS_SIZE 5120
#define ARG_LEN 256
#define MAX_ARGS 32

// Upstream's struct event, member for member.
struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_process proc;
    gadget_uid loginuid;
    __u32 sessionid;
    gadget_errno error_raw;
    __s32 args_count;
    __s32 tty;
    __u32 tty_major;
    __u32 tty_minor;
    _Bool from_rootfs;
    _Bool file_from_rootfs;
    _Bool upper_layer;
    _Bool fupper_layer;
    _Bool pupper_layer;
    __u32 args_size;
    char cwd[512];
    char file[512];
    __u32 dev_major;
    __u32 dev_minor;
    __u64 inode;
    __u64 ctime;
    __u64 fctime;
    __u64 pctime;
    char exepath[512];
    char parent_exepath[512];
    char args[ARGS_SIZE];
};

// What sys_enter saw, kept per thread until sys_exit: the arguments must be read from the old
// image's memory, before the exec replaces it.
struct saved {
    gadget_timestamp timestamp_raw;
    __s32 args_count;
    __u32 args_size;
    char args[ARGS_SIZE];
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(exec, struct event);
#include "gadget_exe.h"
#include "gadget_path.h"
BPF_PERCPU_ARRAY(path_scratch, struct gadget_path_buf, 1);
BPF_PERCPU_ARRAY(scratch, struct saved, 1);
BPF_HASH(execs, u32, struct saved, 1024);

static __always_inline int on_enter(const char *const *argv)
{
    u32 zero = 0;
    struct saved *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    // The time the exec started, as upstream takes it.
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    e->args_count = 0;
    e->args[0] = 0;

    // Arguments are joined by U+00A0 (c2 a0), as upstream's gadget shows them, so the whole
    // list reads as one C string.
    u64 off = 0;
    for (int i = 0; i < MAX_ARGS; i++) {
        const char *argp = NULL;
        bpf_probe_read_user(&argp, sizeof(argp), &argv[i]);
        if (!argp)
            break;
        if (i > 0) {
            if (off > ARGS_SIZE - ARG_LEN - 2)
                break;
            e->args[off] = 0xc2;
            e->args[off + 1] = 0xa0;
            off += 2;
        }
        // The empty asm keeps clang from folding this check into the one above, so the
        // verifier sees the bound on the very register used for the pointer.
        asm volatile("" : "+r"(off));
        if (off > ARGS_SIZE - ARG_LEN)
            break;
        long n = bpf_probe_read_user_str(&e->args[off], ARG_LEN, argp);
        if (n <= 0)
            break;
        off += n - 1;
        e->args_count++;
    }
    e->args_size = off;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    execs.update(&tid, e);
    return 0;
}

static __always_inline int on_exit(void *ctx, long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct saved *saved = execs.lookup(&tid);
    if (!saved)
        return 0;
    if ((GADGET_IGNORE_FAILED && ret < 0 && !GADGET_ONLY_FAILED) ||
        (GADGET_ONLY_FAILED && ret >= 0) || gadget_should_discard()) {
        execs.delete(&tid);
        return 0;
    }
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e) {
        execs.delete(&tid);
        return 0;
    }
    bpf_probe_read_kernel(e->args, sizeof(e->args), saved->args);
    e->timestamp_raw = saved->timestamp_raw;
    e->args_count = saved->args_count;
    e->args_size = saved->args_size;
    gadget_process_populate(&e->proc);
    e->loginuid = gadget_loginuid();
    e->sessionid = gadget_sessionid();
    e->error_raw = ret < 0 ? -ret : 0;

    __u64 task = bpf_get_current_task();
    e->tty = 0;
    e->tty_major = 0;
    e->tty_minor = 0;
    gadget_task_tty(task, &e->tty, &e->tty_major, &e->tty_minor);

    // After a successful exec the task runs the new image: its executable is the one the
    // record is about; its parent's is the parent's. After a failed one it still runs the old
    // image, so these stay unset, as upstream leaves them ("only initialized when the
    // execution succeeded").
    __u64 exe = ret == 0 ? gadget_task_exe_file(task) : 0;
    __u64 inode = gadget_file_inode(exe);
    __u64 pexe = ret == 0 ? gadget_task_exe_file(gadget_read_u64(task,
                                                                 GADGET_OFF_TASK_REAL_PARENT))
                          : 0;
    __u64 pinode = gadget_file_inode(pexe);
    e->ctime = gadget_inode_ctime(inode);
    e->upper_layer = inode && gadget_inode_upper_layer(inode);
    e->from_rootfs = gadget_file_from_rootfs(task, exe);
    e->pctime = gadget_inode_ctime(pinode);
    e->pupper_layer = pinode && gadget_inode_upper_layer(pinode);
    // The file the exec ran. Upstream reads it in security_bprm_check, a kprobe this build
    // does not use; for a binary it is the executable above, for a script upstream reports
    // the script where this reports its interpreter (the script's file is released before
    // any tracepoint sees it).
    e->fctime = e->ctime;
    e->fupper_layer = e->upper_layer;
    e->file_from_rootfs = e->from_rootfs;
    e->dev_major = 0;
    e->dev_minor = 0;
    e->inode = 0;
    e->cwd[0] = 0;
    e->file[0] = 0;
    e->exepath[0] = 0;
    e->parent_exepath[0] = 0;
#if GADGET_PATHS
    u32 zero = 0;
    struct gadget_path_buf *s = path_scratch.lookup(&zero);
    if (inode)
        gadget_inode_id(inode, &e->dev_major, &e->dev_minor, &e->inode);
    if (gadget_path_of(s, gadget_task_pwd(task), e->cwd, sizeof(e->cwd)) <= 0)
        e->cwd[0] = 0;
    // As upstream: the executable the task runs now (the old one after a failed exec).
    __u64 now_exe = exe ? exe : gadget_task_exe_file(task);
    if (!now_exe || gadget_path_of(s, now_exe + GADGET_OFF_FILE_PATH, e->exepath,
                                   sizeof(e->exepath)) <= 0)
        e->exepath[0] = 0;
    if (exe)
        bpf_probe_read_kernel(e->file, sizeof(e->file), e->exepath);
    if (!pexe || gadget_path_of(s, pexe + GADGET_OFF_FILE_PATH, e->parent_exepath,
                                sizeof(e->parent_exepath)) <= 0)
        e->parent_exepath[0] = 0;
#endif
    gadget_submit(events, e);
    execs.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return on_enter(args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return on_enter(args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    return on_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    return on_exit(args, args->ret);
}
