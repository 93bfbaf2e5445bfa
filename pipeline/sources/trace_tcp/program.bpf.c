// trace_tcp: TCP connect, accept and close with both endpoints, from tracepoints only.
//
// sock:inet_sock_set_state carries the sock address, both endpoints and the state change, but
// it fires wherever the state changes: a connect completes and most closes finish in softirq
// context, where the "current" task is whoever was interrupted. So each sock remembers, in
// `socks`, the process that owns it: the connecting process (the CLOSE -> SYN_SENT change runs
// inside connect(2)), the accepting process (sys_exit_accept*, which maps the new fd to its
// sock), or the process that closed it (-> FIN_WAIT1 / -> LAST_ACK run inside close(2) or
// shutdown(2)). Records are attributed to that process.
//
//   connect: emitted when SYN_SENT ends (ESTABLISHED: success; CLOSE: failure with sk_err)
//   accept:  emitted at sys_exit_accept/accept4 for the returned fd
//   close:   emitted at -> CLOSE of an established-at-some-point connection
#define GADGET_NET_SOCK
#include "gadget.h"
#include "gadget_net.h"

#ifndef GADGET_CONNECT_ONLY
#define GADGET_CONNECT_ONLY 0
#endif
#ifndef GADGET_ACCEPT_ONLY
#define GADGET_ACCEPT_ONLY 0
#endif
#ifndef GADGET_FAILURE_ONLY
#define GADGET_FAILURE_ONLY 0
#endif
#ifndef GADGET_OFF_SK_ERR
#error "trace_tcp needs GADGET_OFF_SK_ERR (sock.sk_err) from the running kernel's BTF"
#endif

// include/net/tcp_states.h, spelled out to stay clear of the (older) kernel headers.
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_FIN_WAIT1 4
#define ST_CLOSE 7
#define ST_LAST_ACK 9
#define ST_LISTEN 10
#define ST_NEW_SYN_RECV 12

// upstream's enum event_type; user space names type_raw with it (gadget.yaml enums:).
#define TYPE_CONNECT 0
#define TYPE_ACCEPT 1
#define TYPE_CLOSE 2

#define ERR_ETIMEDOUT 110

struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_process proc;
    gadget_netns_id netns_id;
    struct gadget_l4endpoint_t src;
    struct gadget_l4endpoint_t dst;
    __u8 type_raw;
    gadget_errno error_raw;
    __s32 fd;
    __s32 accept_fd;
};

// Who a sock belongs to, for records emitted outside that process's context.
struct owner {
    struct gadget_process proc;
    __s32 fd;      // the connecting fd, -1 when unknown
    __u8 discard;  // the owner fails the common filters: drop the sock's records
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(tracetcp, struct event);
BPF_HASH(tid_fd, u32, s32, 10240);            // fd of a connect/accept in progress, per thread
BPF_TABLE("lru_hash", u64, struct owner, socks, 16384);

// The tracepoint's arguments. bcc declares the tracepoint's own struct only at the probe, so
// the probe copies what the helpers below need into this one.
struct state_change {
    u64 skaddr;
    int oldstate;
    int newstate;
    __u16 sport;  // host byte order, as the tracepoint records them
    __u16 dport;
    __u16 family;
    __u16 protocol;
    __u8 saddr[4];
    __u8 daddr[4];
    __u8 saddr_v6[16];
    __u8 daddr_v6[16];
};

// Both endpoints from the tracepoint.
static __always_inline void endpoints_from_args(struct state_change *args, struct event *e)
{
    if (args->family == GADGET_AF_INET) {
        __builtin_memcpy(&e->src.addr_raw.v4, args->saddr, 4);
        __builtin_memcpy(&e->dst.addr_raw.v4, args->daddr, 4);
        __builtin_memset(&e->src.addr_raw.v6[4], 0, 12);
        __builtin_memset(&e->dst.addr_raw.v6[4], 0, 12);
        e->src.version = e->dst.version = 4;
    } else {
        __builtin_memcpy(e->src.addr_raw.v6, args->saddr_v6, 16);
        __builtin_memcpy(e->dst.addr_raw.v6, args->daddr_v6, 16);
        e->src.version = e->dst.version = 6;
    }
    e->src.port = args->sport;
    e->dst.port = args->dport;
    e->src.proto_raw = e->dst.proto_raw = GADGET_IPPROTO_TCP;
}

static __always_inline void remember_current(u64 sk, s32 fd)
{
    struct owner o = {};
    gadget_process_populate(&o.proc);
    o.fd = fd;
    o.discard = gadget_should_discard();
    socks.update(&sk, &o);
}

static __always_inline int on_state(struct state_change *args)
{
    if (args->protocol != GADGET_IPPROTO_TCP ||
        (args->family != GADGET_AF_INET && args->family != GADGET_AF_INET6))
        return 0;
    u64 sk = (u64)args->skaddr;
    int old = args->oldstate, new = args->newstate;

    if (new == ST_SYN_SENT) {
        // Inside connect(2): the current task is the connecting process. The source port
        // may not be chosen yet, so the record waits for the handshake to end.
        u32 tid = (u32)bpf_get_current_pid_tgid();
        s32 *fd = tid_fd.lookup(&tid);
        remember_current(sk, fd ? *fd : -1);
        return 0;
    }
    if (new == ST_FIN_WAIT1 || new == ST_LAST_ACK) {
        // Only close(2)/shutdown(2) move a sock here: remember who closed it.
        remember_current(sk, -1);
        return 0;
    }

    __u8 type;
    u32 err = 0;
    if (old == ST_SYN_SENT && (new == ST_ESTABLISHED || new == ST_CLOSE)) {
        type = TYPE_CONNECT;
        if (new == ST_CLOSE) {
            err = gadget_read_u32(sk, GADGET_OFF_SK_ERR);
            if (!err)
                err = ERR_ETIMEDOUT;  // closed without an error: the handshake timed out
        }
        if (GADGET_ACCEPT_ONLY || (GADGET_FAILURE_ONLY && !err)) {
            if (new == ST_CLOSE)
                socks.delete(&sk);
            return 0;
        }
    } else if (new == ST_CLOSE && old != ST_SYN_RECV && old != ST_NEW_SYN_RECV &&
               old != ST_LISTEN && old != ST_CLOSE) {
        type = TYPE_CLOSE;
        if (GADGET_CONNECT_ONLY || GADGET_ACCEPT_ONLY || GADGET_FAILURE_ONLY) {
            socks.delete(&sk);
            return 0;
        }
    } else {
        return 0;
    }

    if (!args->sport || !args->dport)
        goto done;  // no peer yet: upstream skips these too
    struct owner *o = socks.lookup(&sk);
    if (type == TYPE_CONNECT && !o)
        return 0;  // the connect started before the gadget did
    if (o ? o->discard : gadget_should_discard())
        goto done;
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        goto done;
    endpoints_from_args(args, e);
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    if (o)
        bpf_probe_read_kernel(&e->proc, sizeof(e->proc), &o->proc);
    else
        gadget_process_populate(&e->proc);  // an untracked sock: best effort, see README
    e->netns_id = gadget_sock_netns(sk);
    e->type_raw = type;
    e->error_raw = err;
    e->fd = (type == TYPE_CONNECT && o) ? o->fd : -1;
    e->accept_fd = -1;
    gadget_submit(events, e);
done:
    // A finished connect keeps its owner for the close; anything closed is forgotten.
    if (new == ST_CLOSE)
        socks.delete(&sk);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != GADGET_IPPROTO_TCP)
        return 0;  // before copying anything: most changes are TCP, but not all
    struct state_change sc = {
        .skaddr = (u64)args->skaddr,
        .oldstate = args->oldstate,
        .newstate = args->newstate,
        .sport = args->sport,
        .dport = args->dport,
        .family = args->family,
        .protocol = args->protocol,
    };
    __builtin_memcpy(sc.saddr, args->saddr, 4);
    __builtin_memcpy(sc.daddr, args->daddr, 4);
    __builtin_memcpy(sc.saddr_v6, args->saddr_v6, 16);
    __builtin_memcpy(sc.daddr_v6, args->daddr_v6, 16);
    return on_state(&sc);
}

static __always_inline int save_fd(long fd)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s32 v = fd;
    tid_fd.update(&tid, &v);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    return save_fd(args->fd);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    tid_fd.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
    return save_fd(args->fd);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
    return save_fd(args->fd);
}

static __always_inline int on_accept_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    s32 *lfd = tid_fd.lookup(&tid);
    s32 listen_fd = lfd ? *lfd : -1;
    tid_fd.delete(&tid);
    if (ret < 0 || GADGET_CONNECT_ONLY || GADGET_FAILURE_ONLY)
        return 0;
    u64 sk = gadget_sock_from_fd(ret);
    if (!sk || gadget_sock_protocol(sk) != GADGET_IPPROTO_TCP)
        return 0;
    // Remembered even when filtered out, so the sock's close is filtered the same way.
    remember_current(sk, -1);
    if (gadget_should_discard())
        return 0;
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return 0;
    if (!gadget_sock_endpoints(sk, &e->src, &e->dst) || !e->src.port || !e->dst.port) {
        gadget_discard(events, e);
        return 0;
    }
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->proc);
    e->netns_id = gadget_sock_netns(sk);
    e->type_raw = TYPE_ACCEPT;
    e->error_raw = 0;
    e->fd = listen_fd;
    e->accept_fd = ret;
    gadget_submit(events, e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return on_accept_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return on_accept_exit(args->ret);
}
