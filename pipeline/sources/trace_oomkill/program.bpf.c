// trace_oomkill: one record per task the OOM killer picks, from the raw tracepoint mark_victim
// (TP_PROTO(struct task_struct *task, uid_t uid)). It runs in the context of the task whose
// allocation failed (the trigger, recorded as fprocess); the victim is the task argument, read
// at offsets from the running kernel's BTF. Tracepoints only (upstream uses a kprobe on
// oom_kill_process, which this kernel does not allow).
#include "gadget.h"

#if !defined(GADGET_OFF_TASK_MM) || !defined(GADGET_OFF_MM_RSS_STAT) || \
    !defined(GADGET_MM_RSS_STRIDE) || !defined(GADGET_OFF_MM_RSS_COUNT)
#error "trace_oomkill needs the mm rss_stat offsets from pipeline.sources.btf"
#endif

// enum mm counters (include/linux/mm_types_task.h), stable since they were introduced.
#define MM_FILEPAGES 0
#define MM_ANONPAGES 1
#define MM_SHMEMPAGES 3

struct event {
    gadget_timestamp timestamp_raw;
    gadget_mntns_id tmntns_id;
    struct gadget_process fprocess;
    gadget_pid tpid;
    gadget_comm tcomm[16];
    __u64 pages;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(oomkill, struct event);

// One of the mm's resident-page counters, as get_mm_counter() reads it (the counter's global
// value, clamped at 0, like percpu_counter_read_positive()).
static __always_inline __u64 mm_counter(__u64 mm, __u32 member)
{
    __s64 v = (__s64)gadget_read_u64(mm, GADGET_OFF_MM_RSS_STAT + member * GADGET_MM_RSS_STRIDE +
                                             GADGET_OFF_MM_RSS_COUNT);
    return v > 0 ? (__u64)v : 0;
}

RAW_TRACEPOINT_PROBE(mark_victim)
{
    __u64 victim = ctx->args[0];
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return 0;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->fprocess);
    e->tpid = gadget_read_u32(victim, GADGET_OFF_TASK_TGID);
    __builtin_memset(e->tcomm, 0, sizeof(e->tcomm));
    bpf_probe_read_kernel(e->tcomm, sizeof(e->tcomm), (void *)(victim + GADGET_OFF_TASK_COMM));
    e->tmntns_id = gadget_task_mntns_id(victim);
    // The victim's resident set in pages (anon + file + shmem, what the mark_victim tracepoint
    // reports in kB): what the kill frees. Upstream reports the OOM domain's total pages
    // (oom_control.totalpages), which nothing reachable from this hook carries.
    __u64 mm = gadget_read_u64(victim, GADGET_OFF_TASK_MM);
    e->pages = mm ? mm_counter(mm, MM_ANONPAGES) + mm_counter(mm, MM_FILEPAGES) +
                        mm_counter(mm, MM_SHMEMPAGES)
                  : 0;
    gadget_submit(events, e);
    return 0;
}
