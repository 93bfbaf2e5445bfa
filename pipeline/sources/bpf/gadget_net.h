/* Network endpoints in upstream Inspektor Gadget's layout (common.yaml declares the same), and
 * socket lookups for the socket gadgets (trace_tcp, trace_bind).
 *
 * As in gadget_types.h, no kernel struct is dereferenced through a header definition: file,
 * socket and sock members are read with bpf_probe_read_kernel() at the GADGET_OFF_* offsets that
 * pipeline.sources.btf reads from the running kernel's BTF, with addresses kept as plain u64.
 * The socket helpers need those macros; define GADGET_NET_SOCK before including this header to
 * get them (a kernel whose BTF lacks one then fails to compile with the missing macro named).
 */
#ifndef GADGETPIPE_GADGET_NET_H
#define GADGETPIPE_GADGET_NET_H

#define GADGET_AF_INET 2
#define GADGET_AF_INET6 10
#define GADGET_IPPROTO_TCP 6
#define GADGET_IPPROTO_UDP 17

/* An IPv4 address sits in v4 in network byte order (as in the packet); IPv6 fills v6. */
union gadget_ip_addr_t {
	__u8 v6[16];
	__u32 v4;
};

struct gadget_l3endpoint_t {
	union gadget_ip_addr_t addr_raw;
	__u8 version; /* 4 or 6 */
};

struct gadget_l4endpoint_t {
	union gadget_ip_addr_t addr_raw;
	__u16 port;      /* host byte order */
	__u16 proto_raw; /* IPPROTO_* */
	__u8 version;    /* 4 or 6 */
};

_Static_assert(sizeof(struct gadget_l4endpoint_t) == 24, "sizeof(struct gadget_l4endpoint_t)");
_Static_assert(sizeof(struct gadget_l3endpoint_t) == 20, "sizeof(struct gadget_l3endpoint_t)");

#ifdef GADGET_NET_SOCK
#if !defined(GADGET_OFF_TASK_FILES) || !defined(GADGET_OFF_FILES_FDT) || \
    !defined(GADGET_OFF_FDTABLE_MAX_FDS) || !defined(GADGET_OFF_FDTABLE_FD) || \
    !defined(GADGET_OFF_FILE_PRIVATE_DATA) || !defined(GADGET_OFF_SOCKET_FILE) || \
    !defined(GADGET_OFF_SOCKET_SK)
#error "gadget_net.h: the running kernel's BTF lacks a file/socket offset (GADGET_OFF_TASK_FILES, _FILES_FDT, _FDTABLE_*, _FILE_PRIVATE_DATA, _SOCKET_FILE, _SOCKET_SK)"
#endif
#if !defined(GADGET_OFF_SK_DADDR) || !defined(GADGET_OFF_SK_RCV_SADDR) || \
    !defined(GADGET_OFF_SK_DPORT) || !defined(GADGET_OFF_SK_NUM) || \
    !defined(GADGET_OFF_SK_FAMILY) || !defined(GADGET_OFF_SK_V6_DADDR) || \
    !defined(GADGET_OFF_SK_V6_RCV_SADDR) || !defined(GADGET_OFF_SK_NET) || \
    !defined(GADGET_OFF_NET_NS_INUM) || !defined(GADGET_OFF_SK_PROTOCOL)
#error "gadget_net.h: the running kernel's BTF lacks a sock offset (GADGET_OFF_SK_*, GADGET_OFF_NET_NS_INUM)"
#endif

static __always_inline __u16 gadget_read_u16(__u64 base, __u64 off)
{
	__u16 v = 0;

	if (base)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

/* The struct sock behind file descriptor fd of the current task, or 0 when fd is not open or
 * not a socket.  Walks task->files->fdt->fd[fd]->private_data (a struct socket for socket
 * files) and checks socket->file points back at the file, which only a real socket does. */
static __always_inline __u64 gadget_sock_from_fd(long fd)
{
	__u64 task = bpf_get_current_task();
	__u64 files = gadget_read_u64(task, GADGET_OFF_TASK_FILES);
	__u64 fdt = gadget_read_u64(files, GADGET_OFF_FILES_FDT);
	__u32 max_fds = gadget_read_u32(fdt, GADGET_OFF_FDTABLE_MAX_FDS);

	if (fd < 0 || fd >= max_fds)
		return 0;
	__u64 fd_array = gadget_read_u64(fdt, GADGET_OFF_FDTABLE_FD);
	__u64 file = gadget_read_u64(fd_array, (__u64)fd * sizeof(__u64));
	__u64 socket = gadget_read_u64(file, GADGET_OFF_FILE_PRIVATE_DATA);

	if (!socket || gadget_read_u64(socket, GADGET_OFF_SOCKET_FILE) != file)
		return 0;
	return gadget_read_u64(socket, GADGET_OFF_SOCKET_SK);
}

/* sk->sk_family (AF_INET, AF_INET6, ...). */
static __always_inline __u16 gadget_sock_family(__u64 sk)
{
	return gadget_read_u16(sk, GADGET_OFF_SK_FAMILY);
}

/* sk->sk_protocol (IPPROTO_TCP, IPPROTO_UDP, ...). */
static __always_inline __u16 gadget_sock_protocol(__u64 sk)
{
	return gadget_read_u16(sk, GADGET_OFF_SK_PROTOCOL);
}

/* Inode number of the sock's network namespace (sock_net(sk)->ns.inum). */
static __always_inline __u32 gadget_sock_netns(__u64 sk)
{
	return gadget_read_u32(gadget_read_u64(sk, GADGET_OFF_SK_NET), GADGET_OFF_NET_NS_INUM);
}

/* The local (src) and remote (dst) endpoints of an inet sock; returns the IP version (4 or 6),
 * or 0 for another family.  Ports come out in host byte order. */
static __always_inline __u8 gadget_sock_endpoints(__u64 sk, struct gadget_l4endpoint_t *src,
						  struct gadget_l4endpoint_t *dst)
{
	__u16 family = gadget_sock_family(sk);
	__u8 version;

	if (family == GADGET_AF_INET) {
		version = 4;
		src->addr_raw.v4 = gadget_read_u32(sk, GADGET_OFF_SK_RCV_SADDR);
		dst->addr_raw.v4 = gadget_read_u32(sk, GADGET_OFF_SK_DADDR);
	} else if (family == GADGET_AF_INET6) {
		version = 6;
		bpf_probe_read_kernel(src->addr_raw.v6, 16, (void *)(sk + GADGET_OFF_SK_V6_RCV_SADDR));
		bpf_probe_read_kernel(dst->addr_raw.v6, 16, (void *)(sk + GADGET_OFF_SK_V6_DADDR));
	} else {
		return 0;
	}
	src->port = gadget_read_u16(sk, GADGET_OFF_SK_NUM);
	dst->port = __builtin_bswap16(gadget_read_u16(sk, GADGET_OFF_SK_DPORT));
	src->proto_raw = dst->proto_raw = gadget_sock_protocol(sk);
	src->version = dst->version = version;
	return version;
}
#endif /* GADGET_NET_SOCK */

#endif /* GADGETPIPE_GADGET_NET_H */
