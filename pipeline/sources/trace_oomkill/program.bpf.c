// trace_oomkill: one record per task the OOM killer picks, from tracepoint oom:mark_victim.
// The tracepoint runs in the context of the task whose allocation failed (the trigger, recorded
// as fprocess); the victim comes from the tracepoint's arguments. Tracepoints only.
#include "gadget.h"

struct event {
    gadget_timestamp timestamp_raw;
    gadget_mntns_id tmntns_id;
    struct gadget_process fprocess;
    __u32 tpid;
    char tcomm[16];
    __u64 pages;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(oomkill, struct event);

TRACEPOINT_PROBE(oom, mark_victim)
{
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return 0;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->fprocess);
    e->tpid = (__u32)args->pid;
    __builtin_memset(e->tcomm, 0, sizeof(e->tcomm));
    TP_DATA_LOC_READ_STR(e->tcomm, comm, sizeof(e->tcomm));
    // The victim's resident set in pages (the tracepoint reports kB): what the kill frees.
    // Upstream reports the OOM domain's total pages, which this tracepoint does not carry.
    e->pages = (args->anon_rss + args->file_rss + args->shmem_rss) / (4096 / 1024);
    // The victim's task is not reachable from this tracepoint; its mount namespace is known
    // when the trigger is the victim's own thread group (the usual case in a memory cgroup).
    e->tmntns_id = e->tpid == e->fprocess.pid ? e->fprocess.mntns_id : 0;
    gadget_submit(events, e);
    return 0;
}
