// trace_bind: one record per bind(2) of an IPv4/IPv6 socket, from the syscall tracepoints.
//
// sys_enter_bind keeps the fd and the requested address per thread; sys_exit_bind maps the fd
// to its sock (gadget_net.h) and reads what the bind produced: the bound address and port (an
// ephemeral port when 0 was asked for), the protocol, the options and the bound device. A
// failed bind reports the requested address, since the sock has none.
#define GADGET_NET_SOCK
#include "gadget.h"
#include "gadget_net.h"

#ifndef GADGET_IGNORE_ERRORS
#define GADGET_IGNORE_ERRORS 1
#endif
#ifndef GADGET_OFF_SK_BOUND_DEV_IF
#error "trace_bind needs GADGET_OFF_SK_BOUND_DEV_IF from the running kernel's BTF"
#endif

// opts_raw bits, as upstream's enum bind_options_set.
#define OPT_FREEBIND 0x1
#define OPT_TRANSPARENT 0x2
#define OPT_BIND_ADDRESS_NO_PORT 0x4
#define OPT_REUSEADDRESS 0x8
#define OPT_REUSEPORT 0x10

// Bit numbers in inet_sock.inet_flags (include/net/inet_sock.h, since 6.6; upstream uses the
// same constants).
#define INET_FLAGS_FREEBIND 11
#define INET_FLAGS_TRANSPARENT 15
#define INET_FLAGS_BIND_ADDRESS_NO_PORT 18

struct event {
    gadget_timestamp timestamp_raw;
    struct gadget_l4endpoint_t addr;
    struct gadget_process proc;
    gadget_errno error_raw;
    __u8 opts_raw;
    __u32 bound_dev_if;
};

struct request {
    struct gadget_l4endpoint_t addr;  // as requested, for failed binds
    s32 fd;
};

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
GADGET_LAYOUT(bind, struct event);
BPF_HASH(requests, u32, struct request, 10240);

static __always_inline __u8 read_bits(__u64 sk, __u32 bit, __u32 width)
{
    __u8 byte = 0;
    bpf_probe_read_kernel(&byte, 1, (void *)(sk + bit / 8));
    return (byte >> (bit % 8)) & ((1u << width) - 1);
}

static __always_inline __u8 bind_options(__u64 sk)
{
    __u8 opts = 0;
#ifdef GADGET_OFF_INET_FLAGS
    __u64 flags = gadget_read_u64(sk, GADGET_OFF_INET_FLAGS);
    if (flags & (1ULL << INET_FLAGS_FREEBIND))
        opts |= OPT_FREEBIND;
    if (flags & (1ULL << INET_FLAGS_TRANSPARENT))
        opts |= OPT_TRANSPARENT;
    if (flags & (1ULL << INET_FLAGS_BIND_ADDRESS_NO_PORT))
        opts |= OPT_BIND_ADDRESS_NO_PORT;
#endif
#ifdef GADGET_BIT_SK_REUSE
    if (read_bits(sk, GADGET_BIT_SK_REUSE, GADGET_BITS_SK_REUSE))
        opts |= OPT_REUSEADDRESS;
#endif
#ifdef GADGET_BIT_SK_REUSEPORT
    if (read_bits(sk, GADGET_BIT_SK_REUSEPORT, GADGET_BITS_SK_REUSEPORT))
        opts |= OPT_REUSEPORT;
#endif
    return opts;
}

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
    // struct sockaddr_in / sockaddr_in6 (uapi): family, port (network order), then the IPv4
    // address at 4 or, after the flow info, the IPv6 address at 8.
    __u8 sa[24] = {};
    if (bpf_probe_read_user(sa, sizeof(sa), args->umyaddr) < 0) {
        // A short sockaddr_in at the end of a page: retry with its 16 bytes.
        if (bpf_probe_read_user(sa, 16, args->umyaddr) < 0)
            return 0;
    }
    __u16 family = sa[0] | (sa[1] << 8);
    if (family != GADGET_AF_INET && family != GADGET_AF_INET6)
        return 0;
    if (gadget_should_discard())
        return 0;
    struct request r = {};
    r.fd = args->fd;
    r.addr.port = (sa[2] << 8) | sa[3];
    if (family == GADGET_AF_INET) {
        r.addr.version = 4;
        __builtin_memcpy(&r.addr.addr_raw.v4, &sa[4], 4);
    } else {
        r.addr.version = 6;
        __builtin_memcpy(r.addr.addr_raw.v6, &sa[8], 16);
    }
    u32 tid = (u32)bpf_get_current_pid_tgid();
    requests.update(&tid, &r);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct request *r = requests.lookup(&tid);
    if (!r)
        return 0;
    long ret = args->ret;
    if (GADGET_IGNORE_ERRORS && ret != 0)
        goto cleanup;
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        goto cleanup;
    e->timestamp_raw = bpf_ktime_get_boot_ns();
    gadget_process_populate(&e->proc);
    e->error_raw = ret < 0 ? -ret : 0;
    bpf_probe_read_kernel(&e->addr, sizeof(e->addr), &r->addr);
    e->opts_raw = 0;
    e->bound_dev_if = 0;
    u64 sk = gadget_sock_from_fd(r->fd);
    if (sk) {
        e->addr.proto_raw = gadget_sock_protocol(sk);
        e->opts_raw = bind_options(sk);
        e->bound_dev_if = gadget_read_u32(sk, GADGET_OFF_SK_BOUND_DEV_IF);
        if (ret == 0) {
            // What was bound: the address as the sock holds it and the port actually taken.
            struct gadget_l4endpoint_t dst;
            gadget_sock_endpoints(sk, &e->addr, &dst);
        }
    }
    gadget_submit(events, e);
cleanup:
    requests.delete(&tid);
    return 0;
}
