// trace_open: one record per open/openat/openat2, emitted when the syscall returns so the
// record carries the fd or the errno. Tracepoints only.
//
// Where the kernel lets a program reach the task's saved user registers (gadget_syscall.h:
// Linux 5.15 on x86_64 and arm64), the exit program reads the syscall's arguments there and is
// the only program: no entry program, no map (bench/kcost.py: ~350 -> ~230 ns per open).
// Elsewhere the entry program keeps the arguments per thread in a map until the exit.
#include "gadget.h"
#include "gadget_syscall.h"

#ifndef GADGET_ONLY_FAILED
#define GADGET_ONLY_FAILED 0
#endif
#ifndef GADGET_PATHS
#define GADGET_PATHS 0
#endif

#define NAME_MAX 255

// Payload 0. Upstream's struct also holds `struct gadget_user_stack ustack` (zeros unless user
// stacks are collected, which this build does not do) and `char fpath[GADGET_PATH_MAX]` (only
// with paths=true): here those are further payloads (gadget.yaml `payloads:`), so the record
// the hot path copies stays this size; with paths=true the ring record carries fpath after it.
struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_process proc;
    gadget_errno error_raw;
    __u32 fd;
    gadget_file_flags flags_raw;
    gadget_file_mode mode_raw;
    char fname[NAME_MAX];
};

// The syscall's arguments. The path stays a user pointer: it is read at exit, straight into
// the ring record, so nothing is copied twice.
struct args_t {
    const char *fname;
    __u32 flags;
    __u32 mode; // the low 16 bits, as upstream keeps them
};

// openat2's struct open_how (uapi, fixed layout).
struct gadget_open_how {
    __u64 flags;
    __u64 mode;
    __u64 resolve;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(open, struct event);
#if GADGET_PATHS
#include "gadget_path.h"
BPF_PERCPU_ARRAY(path_scratch, struct gadget_path_buf, 1);
struct record {
    struct event e;
    char fpath[GADGET_PATH_MAX];
};
#else
struct record {
    struct event e;
};
#endif

static __always_inline void emit(long ret, const struct args_t *a)
{
    struct record *r = gadget_reserve(events, sizeof(*r));
    if (!r)
        return;
    struct event *e = &r->e;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->proc);
    e->error_raw = ret < 0 ? -ret : 0;
    e->fd = ret < 0 ? 0 : ret;
    e->flags_raw = a->flags;
    e->mode_raw = a->mode;
    if (bpf_probe_read_user_str(e->fname, sizeof(e->fname), a->fname) < 0)
        e->fname[0] = 0;
#if GADGET_PATHS
    // The path the fd resolved to (symlinks followed, relative to nothing), as upstream's
    // read_full_path_of_open_file_fd: empty for a failed open.
    u32 zero = 0;
    struct gadget_path_buf *scratch = path_scratch.lookup(&zero);
    if (ret < 0 || gadget_path_of_fd(scratch, (__u32)ret, r->fpath, sizeof(r->fpath)) <= 0)
        r->fpath[0] = 0;
#endif
    gadget_submit(events, r);
}

#ifdef GADGET_SYSCALL_ARGS_AT_EXIT

// Which argument holds what: open(path, flags, mode), openat(dfd, path, flags, mode),
// openat2(dfd, path, how, size).
#define OPEN 0
#define OPENAT 1
#define OPENAT2 2

static __always_inline int on_exit(long ret, int call)
{
    if ((GADGET_ONLY_FAILED && ret >= 0) || gadget_should_discard())
        return 0;
    __u64 regs = gadget_syscall_regs();
    struct args_t a = {};
    if (call == OPEN) {
        a.fname = (const char *)gadget_syscall_arg(regs, 0);
        a.flags = gadget_syscall_arg(regs, 1);
        a.mode = gadget_syscall_arg(regs, 2) & 0xffff;
    } else if (call == OPENAT) {
        a.fname = (const char *)gadget_syscall_arg(regs, 1);
        a.flags = gadget_syscall_arg(regs, 2);
        a.mode = gadget_syscall_arg(regs, 3) & 0xffff;
    } else {
        struct gadget_open_how how = {};
        bpf_probe_read_user(&how, sizeof(how), (void *)gadget_syscall_arg(regs, 2));
        a.fname = (const char *)gadget_syscall_arg(regs, 1);
        a.flags = (__u32)how.flags;
        a.mode = (__u32)how.mode & 0xffff;
    }
    emit(ret, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
    return on_exit(args->ret, OPEN);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    return on_exit(args->ret, OPENAT);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
    return on_exit(args->ret, OPENAT2);
}

#else // the arguments from sys_enter, kept per thread

BPF_HASH(start, u32, struct args_t, 10240);

static __always_inline int on_enter(const char *fname, __u32 flags, __u32 mode)
{
    // Filters run at entry so discarded threads never touch the map.
    if (gadget_should_discard())
        return 0;
    struct args_t a = {.fname = fname, .flags = flags, .mode = mode & 0xffff};
    u32 tid = (u32)bpf_get_current_pid_tgid();
    start.update(&tid, &a);
    return 0;
}

static __always_inline int on_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct args_t *a = start.lookup(&tid);
    if (!a)
        return 0;
    if (!GADGET_ONLY_FAILED || ret < 0)
        emit(ret, a);
    start.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return on_enter(args->filename, args->flags, args->mode);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return on_enter(args->filename, args->flags, args->mode);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    struct gadget_open_how how = {};
    bpf_probe_read_user(&how, sizeof(how), args->how);
    return on_enter(args->filename, (__u32)how.flags, (__u32)how.mode);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
    return on_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    return on_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
    return on_exit(args->ret);
}

#endif
