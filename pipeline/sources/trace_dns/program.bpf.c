// trace_dns, kernel side: a socket filter on an AF_PACKET socket (all interfaces of the
// daemon's network namespace) that copies every UDP packet from or to port 53 or 5353 into the
// ring, from its IP header on, after a fixed header. DNS itself is parsed in user space
// (hooks.py), per batch. Containers' network namespaces get sockets of their own (netns.py). The filter always returns 0, so the packet socket itself never
// queues anything.
//
// Records vary in size (header + copied bytes), so they are written with gadget_output()
// (bpf_ringbuf_output) from a per-CPU scratch buffer. The sending process is known only for outgoing packets, which
// the packet tap sees in the sender's context; user space attributes incoming ones.
#include "gadget.h"

#ifndef GADGET_PATHS
#define GADGET_PATHS 0
#endif

#define MAX_COPY 1536  // IP + UDP headers and a DNS message of up to ~1.4 KiB
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define PKT_OUTGOING 4

struct record {
    __u64 timestamp;            // CLOCK_BOOTTIME ns
    struct gadget_process proc; // valid when has_proc
    __u32 ifindex;
    __u16 copied;               // bytes of data[] (from the IP header)
    __u8 pkt_type;              // skb->pkt_type (PACKET_HOST, ... PACKET_OUTGOING)
    __u8 has_proc;
    __u16 l4_off;               // UDP header offset in data[]
    __u8 version;               // 4 or 6
    __u8 __pad;
    __u32 netns;                // skb->cb[0]: set by a container namespace's dispatcher, else 0
#if GADGET_PATHS
    char cwd[512];              // the sender's working directory and executable (valid when
    char exepath[512];          // has_proc; upstream's socket enricher keeps the same)
#endif
    __u8 data[MAX_COPY];
};

#define RECORD_HEADER (88 + GADGET_PATHS * 1024)
_Static_assert(__builtin_offsetof(struct record, data) == RECORD_HEADER, "record header");

GADGET_RINGBUF(events, GADGET_RING_PAGES, 1);
#include "gadget_lost.h"
BPF_PERCPU_ARRAY(scratch, struct record, 1);
// Entry 0 is dns_filter: the dispatchers attached in containers' network namespaces tail-call
// it after writing the namespace into cb[0] (netns.py).
BPF_PROG_ARRAY(gadget_dns_dispatch, 1);
#if GADGET_PATHS
#include "gadget_exe.h"
#include "gadget_path.h"
BPF_PERCPU_ARRAY(path_scratch, struct gadget_path_buf, 1);
#endif

static __always_inline bool is_dns_port(__u16 port)
{
    return port == 53 || port == 5353;
}

int dns_filter(struct __sk_buff *skb)
{
    __u8 hdr[8];
    __u16 l4_off, total;
    __u8 version;

    if (skb->protocol == __builtin_bswap16(ETH_P_IP)) {
        // version/IHL, ..., total length at 2, fragment offset at 6, protocol at 9.
        __u8 ip[10];
        if (bpf_skb_load_bytes_relative(skb, 0, ip, sizeof(ip), BPF_HDR_START_NET) < 0)
            return 0;
        if (ip[9] != 17 || ((ip[6] & 0x1f) | ip[7]))
            return 0;  // not UDP, or a non-first fragment (no UDP header)
        version = 4;
        l4_off = (ip[0] & 0xf) * 4;
        total = (ip[2] << 8) | ip[3];
    } else if (skb->protocol == __builtin_bswap16(ETH_P_IPV6)) {
        // Payload length at 4, next header at 6; extension headers are not followed.
        __u8 ip6[8];
        if (bpf_skb_load_bytes_relative(skb, 0, ip6, sizeof(ip6), BPF_HDR_START_NET) < 0)
            return 0;
        if (ip6[6] != 17)
            return 0;
        version = 6;
        l4_off = 40;
        total = 40 + ((ip6[4] << 8) | ip6[5]);
    } else {
        return 0;
    }
    if (bpf_skb_load_bytes_relative(skb, l4_off, hdr, sizeof(hdr), BPF_HDR_START_NET) < 0)
        return 0;
    __u16 sport = (hdr[0] << 8) | hdr[1], dport = (hdr[2] << 8) | hdr[3];
    if (!is_dns_port(sport) && !is_dns_port(dport))
        return 0;

    u32 zero = 0;
    struct record *r = scratch.lookup(&zero);
    if (!r)
        return 0;
    r->timestamp = bpf_ktime_get_boot_ns();
    r->ifindex = skb->ifindex;
    r->pkt_type = skb->pkt_type;
    r->l4_off = l4_off;
    r->version = version;
    r->netns = skb->cb[0];
    r->has_proc = r->pkt_type == PKT_OUTGOING;
    if (r->has_proc)
        gadget_process_populate(&r->proc);
#if GADGET_PATHS
    r->cwd[0] = 0;
    r->exepath[0] = 0;
    if (r->has_proc) {
        __u64 task = bpf_get_current_task();
        __u64 exe = gadget_task_exe_file(task);
        struct gadget_path_buf *s = path_scratch.lookup(&zero);
        if (gadget_path_of(s, gadget_task_pwd(task), r->cwd, sizeof(r->cwd)) <= 0)
            r->cwd[0] = 0;
        if (!exe || gadget_path_of(s, exe + GADGET_OFF_FILE_PATH, r->exepath,
                                   sizeof(r->exepath)) <= 0)
            r->exepath[0] = 0;
    }
#endif

    u64 copy = total < MAX_COPY ? total : MAX_COPY;  // u64: no zero-extending copies
    // One bound per check, each behind an empty asm: clang would otherwise merge them into a
    // single unsigned range test on a copy of the register, and the verifier must see both
    // bounds on the very register passed as the length.
    asm volatile("" : "+r"(copy));
    if (copy < 28)
        return 0;  // shorter than IPv4 + UDP headers
    asm volatile("" : "+r"(copy));
    if (copy > MAX_COPY)
        return 0;
    if (bpf_skb_load_bytes_relative(skb, 0, r->data, copy, BPF_HDR_START_NET) < 0)
        return 0;
    r->copied = copy;
    gadget_output(events, r, RECORD_HEADER + copy);  // a full ring is counted in gadget_lost
    return 0;
}
