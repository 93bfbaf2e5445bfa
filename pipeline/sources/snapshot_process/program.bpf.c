// snapshot_process: one record per process (or thread, with threads=true), written by a BPF
// task iterator (iter/task) into the iterator's seq_file; user space reads the iterator fd once
// per snapshot (hooks.py). No ring buffer: the output is as large as the task list.
#include "gadget.h"
#define GADGET_MNTNS_FILTER_IDX 1  // no ring: the container selection's map is the only table
#include "gadget_containers.h"

#if !defined(GADGET_OFF_TASK_REAL_CRED) || !defined(GADGET_OFF_CRED_UID) || \
    !defined(GADGET_OFF_CRED_GID) || !defined(GADGET_OFF_TASK_START_BOOTTIME)
#error "snapshot_process needs the cred and start_boottime offsets from pipeline.sources.btf"
#endif

#ifndef GADGET_THREADS
#define GADGET_THREADS 0
#endif

// The iterator context (kernel/bpf/task_iter.c). Declared here with untyped pointers: the
// kernel headers bcc compiles against do not define it, and task fields are read by offset.
struct gadget_iter_meta {
    void *seq;
    __u64 session_id;
    __u64 seq_num;
};
struct bpf_iter__task {
    struct gadget_iter_meta *meta;
    void *task;
};

// What the iterator writes per task: upstream's record (struct gadget_process, payload 0), then
// the task's start (boot ns), which user space turns into the `start_time` payload.
struct process_entry {
    struct gadget_process p;
    __u64 start_time;
};

GADGET_LAYOUT(processes, struct gadget_process);

#ifdef GADGET_FILTER_COMM
// As gadget_filter_comm_differs(), for the iterated task's comm instead of the current one.
static __always_inline bool comm_differs(const char *comm)
{
#pragma unroll
    for (int i = 0; i < 15; i++) {
        char want = i < (int)sizeof(GADGET_FILTER_COMM) ? (GADGET_FILTER_COMM)[i] : 0;

        if (comm[i] != want)
            return true;
        if (!want)
            return false;
    }
    return false;
}
#endif

// The common filters (gadget_filter.h) test the current task, which here is the reader; this
// applies the same GADGET_FILTER_* settings to the iterated task.
static __always_inline bool discard(struct gadget_process *e)
{
#ifdef GADGET_FILTER_PID
    if (e->pid != (__u32)(GADGET_FILTER_PID))
        return true;
#endif
#ifdef GADGET_FILTER_TID
    if (e->tid != (__u32)(GADGET_FILTER_TID))
        return true;
#endif
#ifdef GADGET_FILTER_UID
    if (e->creds.uid != (__u32)(GADGET_FILTER_UID))
        return true;
#endif
#ifdef GADGET_FILTER_GID
    if (e->creds.gid != (__u32)(GADGET_FILTER_GID))
        return true;
#endif
#ifdef GADGET_FILTER_MNTNS
    if (e->mntns_id != (__u64)(GADGET_FILTER_MNTNS))
        return true;
#endif
#ifdef GADGET_FILTER_COMM
    if (comm_differs(e->comm))
        return true;
#endif
#ifdef GADGET_FILTER_CONTAINERS
    if (gadget_mntns_unselected(e->mntns_id))
        return true;
#endif
    return false;
}

BPF_ITER(task)
{
    void *seq = ctx->meta->seq;
    __u64 task = (__u64)ctx->task;

    if (!task)
        return 0;  // the end-of-iteration call
    struct process_entry r = {};
    struct gadget_process *e = &r.p;
    e->pid = gadget_read_u32(task, GADGET_OFF_TASK_TGID);
    e->tid = gadget_read_u32(task, GADGET_OFF_TASK_PID);
    if (!GADGET_THREADS && e->pid != e->tid)
        return 0;  // processes only: their thread group leaders
    bpf_probe_read_kernel(e->comm, sizeof(e->comm), (void *)(task + GADGET_OFF_TASK_COMM));
    e->mntns_id = gadget_task_mntns_id(task);
    __u64 cred = gadget_read_u64(task, GADGET_OFF_TASK_REAL_CRED);
    e->creds.uid = gadget_read_u32(cred, GADGET_OFF_CRED_UID);
    e->creds.gid = gadget_read_u32(cred, GADGET_OFF_CRED_GID);
    __u64 parent = gadget_read_u64(task, GADGET_OFF_TASK_REAL_PARENT);
    if (parent)
        bpf_probe_read_kernel(e->parent.comm, sizeof(e->parent.comm),
                              (void *)(parent + GADGET_OFF_TASK_COMM));
    e->parent.pid = gadget_read_u32(parent, GADGET_OFF_TASK_TGID);
    e->parent.tid = gadget_read_u32(parent, GADGET_OFF_TASK_PID);
    r.start_time = gadget_read_u64(task, GADGET_OFF_TASK_START_BOOTTIME);
    if (discard(e))
        return 0;
    bpf_seq_write(seq, &r, sizeof(r));
    return 0;
}
