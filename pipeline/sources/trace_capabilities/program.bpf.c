// trace_capabilities: one record per capability check, from tracepoint capability:cap_capable
// (it fires when cap_capable() returns, with the verdict). Tracepoints only.
//
// The readable `cap`, `cap_effective`, `syscall` and `kstack` fields are derived in user space
// from cap_raw, cap_effective_raw, syscall_raw and kstack_raw (gadget.yaml, hooks.py); the
// private __kstack (the stack's addresses) is filled in user space from the stack map.
#include "gadget.h"
#include "gadget_user_stack.h"

#if !defined(GADGET_OFF_TASK_REAL_CRED) || !defined(GADGET_OFF_CRED_USER_NS) || \
    !defined(GADGET_OFF_USER_NS_INUM) || !defined(GADGET_OFF_CRED_CAP_EFFECTIVE) || \
    !defined(GADGET_OFF_TASK_FLAGS)
#error "trace_capabilities needs the cred/user_namespace offsets from pipeline.sources.btf"
#endif

#ifndef GADGET_UNIQUE
#define GADGET_UNIQUE 0
#endif
#ifndef GADGET_COLLECT_KSTACK
#define GADGET_COLLECT_KSTACK 1
#endif
#ifndef GADGET_COLLECT_USTACK
#define GADGET_COLLECT_USTACK 0
#endif

#define PF_KTHREAD 0x00200000
// Frames of the stacks kept in the record (innermost first), for the derived `kstack` and
// `ustack.*` (user space copies them from the stack tables, hooks.py).
#define GADGET_KSTACK_FRAMES 32
#define GADGET_USTACK_FRAMES 32

struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_process proc;
    __u64 current_userns;
    __u64 target_userns;
    __u64 cap_effective_raw;
    __u32 cap_raw;
    bool capable;
    __s32 audit;
    __s32 insetid;
    gadget_syscall syscall_raw;
    gadget_kernel_stack kstack_raw;
    struct gadget_user_stack ustack;
    __u64 __ustack[GADGET_USTACK_FRAMES];
    __u64 __kstack[GADGET_KSTACK_FRAMES];
};

struct unique_key {
    __u64 mntns_id;
    __s32 cap;
    __u32 pad;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(capabilities, struct event);
BPF_STACK_TRACE(kstacks, 8192);
BPF_STACK_TRACE(ustacks, GADGET_COLLECT_USTACK ? 10000 : 1);
BPF_HASH(seen, struct unique_key, __u8, 10240);

TRACEPOINT_PROBE(capability, cap_capable)
{
    __u64 task = bpf_get_current_task();
    __u64 real_cred = gadget_read_u64(task, GADGET_OFF_TASK_REAL_CRED);

    // Subjective credentials overridden (override_creds(), e.g. overlayfs copy-up): the check
    // is not the task's own, as upstream skips it too.
    if ((__u64)args->cred != real_cred)
        return 0;
    if (gadget_should_discard())
        return 0;
    if (GADGET_UNIQUE) {
        struct unique_key key = {.mntns_id = gadget_get_mntns_id(), .cap = args->cap};
        __u8 one = 1;
        if (seen.lookup(&key))
            return 0;
        seen.update(&key, &one);
    }

    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return 0;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->proc);
    __u64 user_ns = gadget_read_u64(real_cred, GADGET_OFF_CRED_USER_NS);
    e->current_userns = gadget_read_u32(user_ns, GADGET_OFF_USER_NS_INUM);
    e->target_userns = gadget_read_u32((__u64)args->target_ns, GADGET_OFF_USER_NS_INUM);
    e->cap_effective_raw = gadget_read_u64(real_cred, GADGET_OFF_CRED_CAP_EFFECTIVE);
    e->cap_raw = (__u32)args->cap;
    e->capable = args->ret == 0;
    // The tracepoint does not carry cap_capable()'s opts: user space infers audit and insetid
    // from the kernel stack (ns_capable_noaudit(), ns_capable_setid() ...); -1 = unknown.
    e->audit = -1;
    e->insetid = -1;

    e->syscall_raw = (__u64)-1;
#ifdef GADGET_OFF_PT_REGS_ORIG_AX
    // The syscall this check happens in: orig_ax of the registers saved at syscall entry.
    // Kernel threads have no syscall.
    if (!(gadget_read_u32(task, GADGET_OFF_TASK_FLAGS) & PF_KTHREAD)) {
        __u64 regs = bpf_task_pt_regs(bpf_get_current_task_btf());
        e->syscall_raw = gadget_read_u64(regs, GADGET_OFF_PT_REGS_ORIG_AX);
    }
#endif
    e->kstack_raw = (__u32)-1;
    if (GADGET_COLLECT_KSTACK) {
        int id = kstacks.get_stackid(args, 0);
        if (id >= 0)
            e->kstack_raw = (__u32)id;
    }
    __builtin_memset(&e->ustack, 0, sizeof(e->ustack));
    if (GADGET_COLLECT_USTACK && !(gadget_read_u32(task, GADGET_OFF_TASK_FLAGS) & PF_KTHREAD))
        gadget_user_stack_fill(&e->ustack,
                               ustacks.get_stackid(args, BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP));
    gadget_submit(events, e);
    return 0;
}
