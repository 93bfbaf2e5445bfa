// trace_signal: signals sent, with sender, target and result. Tracepoints only.
//
// By default every generated signal is reported from signal:signal_generate, which fires in
// the sender's context (for kill(2) and friends; signals the kernel raises itself, such as
// SIGCHLD at exit, carry whatever task raised them). With kill-only, only kill/tkill/tgkill
// calls are reported, from their syscall tracepoints, with the syscall's result, so failed
// calls (ESRCH, EPERM) show up too. This is upstream's split.
#include "gadget.h"

#ifndef GADGET_ONLY_FAILED
#define GADGET_ONLY_FAILED 0
#endif
#ifndef GADGET_KILL_ONLY
#define GADGET_KILL_ONLY 0
#endif
#ifndef GADGET_TARGET_SIGNAL
#define GADGET_TARGET_SIGNAL 0
#endif

struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_process proc;
    __u32 tpid;
    gadget_signal sig_raw;
    gadget_errno error_raw;
};

struct call {
    __u32 tpid;
    __u32 sig;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(signal, struct event);
BPF_HASH(calls, u32, struct call, 10240);

static __always_inline void emit(__u32 tpid, __u32 sig, __u32 err)
{
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->proc);
    e->tpid = tpid;
    e->sig_raw = sig;
    e->error_raw = err;
    gadget_submit(events, e);
}

static __always_inline int on_kill_enter(long tpid, long sig)
{
    if (!GADGET_KILL_ONLY)
        return 0;
    if (GADGET_TARGET_SIGNAL && sig != GADGET_TARGET_SIGNAL)
        return 0;
    if (gadget_should_discard())
        return 0;
    struct call c = {.tpid = tpid, .sig = sig};
    u32 tid = (u32)bpf_get_current_pid_tgid();
    calls.update(&tid, &c);
    return 0;
}

static __always_inline int on_kill_exit(long ret)
{
    if (!GADGET_KILL_ONLY)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct call *c = calls.lookup(&tid);
    if (!c)
        return 0;
    if (!GADGET_ONLY_FAILED || ret < 0)
        emit(c->tpid, c->sig, ret < 0 ? -ret : 0);
    calls.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_kill)
{
    return on_kill_enter(args->pid, args->sig);
}

TRACEPOINT_PROBE(syscalls, sys_exit_kill)
{
    return on_kill_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_tkill)
{
    return on_kill_enter(args->pid, args->sig);
}

TRACEPOINT_PROBE(syscalls, sys_exit_tkill)
{
    return on_kill_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_tgkill)
{
    return on_kill_enter(args->pid, args->sig);
}

TRACEPOINT_PROBE(syscalls, sys_exit_tgkill)
{
    return on_kill_exit(args->ret);
}

TRACEPOINT_PROBE(signal, signal_generate)
{
    if (GADGET_KILL_ONLY)
        return 0;
    int sig = args->sig;
    // The tracepoint's errno is the siginfo's si_errno (upstream reports it as the error).
    int err = args->errno;
    if (err < 0)
        err = -err;
    if (GADGET_TARGET_SIGNAL && sig != GADGET_TARGET_SIGNAL)
        return 0;
    if (GADGET_ONLY_FAILED && !err)
        return 0;
    if (gadget_should_discard())
        return 0;
    emit(args->pid, sig, err);
    return 0;
}
