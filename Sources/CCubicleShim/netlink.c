/* rtnetlink for a session's link: a veth pair, its addresses and routes, set up as `ip` would do it but
 * without a process per link. Each request waits for the kernel's acknowledgement, so an error names its
 * step and carries the kernel's errno. */
#define _GNU_SOURCE
#include "cubicle_shim.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct nlreq {
    struct nlmsghdr h;
    char body[1024];
};

static void *tail(struct nlreq *r) { return (char *)&r->h + NLMSG_ALIGN(r->h.nlmsg_len); }

static struct rtattr *attr(struct nlreq *r, unsigned short type, const void *data, size_t len) {
    struct rtattr *a = tail(r);
    a->rta_type = type;
    a->rta_len = RTA_LENGTH(len);
    if (len) memcpy(RTA_DATA(a), data, len);
    r->h.nlmsg_len = NLMSG_ALIGN(r->h.nlmsg_len) + RTA_ALIGN(a->rta_len);
    return a;
}

static void end_nest(struct nlreq *r, struct rtattr *nest) { nest->rta_len = (unsigned short)((char *)tail(r) - (char *)nest); }

/* Sends one request and reads its acknowledgement: 0, or -1 with the kernel's errno. */
static int talk(int fd, struct nlreq *r) {
    static unsigned seq;
    r->h.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
    r->h.nlmsg_seq = __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED);
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    ssize_t n;
    do { n = sendto(fd, &r->h, r->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    char buf[4096];
    for (;;) {
        do { n = recv(fd, buf, sizeof buf, 0); } while (n < 0 && errno == EINTR);
        if (n < 0) return -1;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != r->h.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                if (e->error == 0) return 0;
                errno = -e->error;
                return -1;
            }
        }
    }
}

static int route_socket(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) return -1;
    struct sockaddr_nl local = { .nl_family = AF_NETLINK };
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}

static int set_up(int fd, int ifindex) {
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)), .nlmsg_type = RTM_NEWLINK } };
    struct ifinfomsg *i = NLMSG_DATA(&r.h);
    i->ifi_family = AF_UNSPEC;
    i->ifi_index = ifindex;
    i->ifi_flags = IFF_UP;
    i->ifi_change = IFF_UP;
    return talk(fd, &r);
}

static int add_address(int fd, int ifindex, uint32_t address_be) {
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct ifaddrmsg)), .nlmsg_type = RTM_NEWADDR,
                              .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL } };
    struct ifaddrmsg *a = NLMSG_DATA(&r.h);
    a->ifa_family = AF_INET;
    a->ifa_prefixlen = 32;
    a->ifa_scope = RT_SCOPE_UNIVERSE;
    a->ifa_index = (unsigned)ifindex;
    attr(&r, IFA_LOCAL, &address_be, 4);
    attr(&r, IFA_ADDRESS, &address_be, 4);
    return talk(fd, &r);
}

/* A route to destination/prefix out of ifindex: on the link itself (gateway 0) or through gateway. */
static int add_route(int fd, int ifindex, uint32_t destination_be, unsigned char prefix, uint32_t gateway_be) {
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg)), .nlmsg_type = RTM_NEWROUTE,
                              .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL } };
    struct rtmsg *m = NLMSG_DATA(&r.h);
    m->rtm_family = AF_INET;
    m->rtm_dst_len = prefix;
    m->rtm_table = RT_TABLE_MAIN;
    m->rtm_protocol = RTPROT_STATIC;
    m->rtm_scope = gateway_be ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK;
    m->rtm_type = RTN_UNICAST;
    if (prefix) attr(&r, RTA_DST, &destination_be, 4);
    if (gateway_be) attr(&r, RTA_GATEWAY, &gateway_be, 4);
    uint32_t oif = (uint32_t)ifindex;
    attr(&r, RTA_OIF, &oif, 4);
    return talk(fd, &r);
}

static int veth_create(int fd, const char *host_name, int netns_fd) {
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)), .nlmsg_type = RTM_NEWLINK,
                              .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL } };
    struct ifinfomsg *i = NLMSG_DATA(&r.h);
    i->ifi_family = AF_UNSPEC;
    attr(&r, IFLA_IFNAME, host_name, strlen(host_name) + 1);
    struct rtattr *info = attr(&r, IFLA_LINKINFO, NULL, 0);
    attr(&r, IFLA_INFO_KIND, "veth", 4);
    struct rtattr *data = attr(&r, IFLA_INFO_DATA, NULL, 0);
    struct rtattr *peer = attr(&r, VETH_INFO_PEER, NULL, 0);
    struct ifinfomsg *pi = tail(&r);
    memset(pi, 0, sizeof *pi);
    pi->ifi_family = AF_UNSPEC;
    r.h.nlmsg_len += NLMSG_ALIGN(sizeof *pi);
    attr(&r, IFLA_IFNAME, "eth0", 5);
    uint32_t ns = (uint32_t)netns_fd;
    attr(&r, IFLA_NET_NS_FD, &ns, 4);
    end_nest(&r, peer);
    end_nest(&r, data);
    end_nest(&r, info);
    return talk(fd, &r);
}

/* A netlink socket of another network namespace, opened by entering it on this thread and coming back. */
static int route_socket_in(int netns_fd, int host_netns_fd) {
    if (setns(netns_fd, CLONE_NEWNET) < 0) return -1;
    int fd = route_socket();
    int saved = errno;
    if (setns(host_netns_fd, CLONE_NEWNET) < 0) abort();  /* a thread left in a sandbox's namespace must not go on */
    errno = saved;
    return fd;
}

int cubicle_link_create(const char *host_name, int netns_fd, int host_netns_fd, uint32_t gateway_be, uint32_t session_be,
                        const char **step) {
    int host = -1, inner = -1, rc = -1;
    *step = "open rtnetlink";
    if ((host = route_socket()) < 0) goto out;
    *step = "create veth pair";
    if (veth_create(host, host_name, netns_fd) < 0) goto out;
    *step = "find host end";
    int host_index = (int)if_nametoindex(host_name);
    if (host_index == 0) goto out;
    *step = "address host end";
    if (add_address(host, host_index, gateway_be) < 0) goto out;
    *step = "host end up";
    if (set_up(host, host_index) < 0) goto out;
    *step = "route to session";
    if (add_route(host, host_index, session_be, 32, 0) < 0) goto out;
    *step = "open rtnetlink in session namespace";
    if ((inner = route_socket_in(netns_fd, host_netns_fd)) < 0) goto out;
    /* The peer's index inside is the one netlink reports there; eth0 is the only device besides lo. */
    struct nlreq q = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)), .nlmsg_type = RTM_GETLINK } };
    struct ifinfomsg *qi = NLMSG_DATA(&q.h);
    qi->ifi_family = AF_UNSPEC;
    attr(&q, IFLA_IFNAME, "eth0", 5);
    q.h.nlmsg_flags = NLM_F_REQUEST;
    q.h.nlmsg_seq = 1;
    *step = "find eth0";
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    if (sendto(inner, &q.h, q.h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) goto out;
    char buf[4096];
    ssize_t n;
    do { n = recv(inner, buf, sizeof buf, 0); } while (n < 0 && errno == EINTR);
    if (n < 0) goto out;
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    if (!NLMSG_OK(h, (unsigned)n) || h->nlmsg_type != RTM_NEWLINK) {
        if (NLMSG_OK(h, (unsigned)n) && h->nlmsg_type == NLMSG_ERROR) errno = -((struct nlmsgerr *)NLMSG_DATA(h))->error;
        else errno = EPROTO;
        goto out;
    }
    int inner_index = ((struct ifinfomsg *)NLMSG_DATA(h))->ifi_index;
    *step = "address eth0";
    if (add_address(inner, inner_index, session_be) < 0) goto out;
    *step = "eth0 up";
    if (set_up(inner, inner_index) < 0) goto out;
    *step = "route to gateway";
    if (add_route(inner, inner_index, gateway_be, 32, 0) < 0) goto out;
    *step = "default route";
    if (add_route(inner, inner_index, 0, 0, gateway_be) < 0) goto out;
    rc = host_index;
out:;
    int saved = errno;
    if (inner >= 0) close(inner);
    if (host >= 0) close(host);
    errno = saved;
    return rc;
}

int cubicle_link_delete(const char *host_name) {
    int fd = route_socket();
    if (fd < 0) return -1;
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)), .nlmsg_type = RTM_DELLINK } };
    struct ifinfomsg *i = NLMSG_DATA(&r.h);
    i->ifi_family = AF_UNSPEC;
    attr(&r, IFLA_IFNAME, host_name, strlen(host_name) + 1);
    int rc = talk(fd, &r);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* NFLOG: the packets the egress rules refuse, copied to this socket by the kernel (`log group N`). */
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_log.h>
#include <netinet/ip.h>

static int nflog_config(int fd, uint16_t group, uint8_t family, const void *payload, unsigned short type, size_t len) {
    struct nlreq r = { .h = { .nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg)),
                              .nlmsg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG } };
    struct nfgenmsg *g = NLMSG_DATA(&r.h);
    g->nfgen_family = family;
    g->version = NFNETLINK_V0;
    g->res_id = htons(group);
    attr(&r, type, payload, len);
    return talk(fd, &r);
}

int cubicle_nflog_open(uint16_t group) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
    if (fd < 0) return -1;
    struct sockaddr_nl local = { .nl_family = AF_NETLINK };
    struct nfulnl_msg_config_cmd bind_cmd = { .command = NFULNL_CFG_CMD_BIND };
    /* The IPv4 header and the first bytes of TCP/UDP (the ports) are all that is read. */
    struct nfulnl_msg_config_mode mode = { .copy_range = htonl(64), .copy_mode = NFULNL_COPY_PACKET };
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0
        || nflog_config(fd, group, AF_UNSPEC, &bind_cmd, NFULA_CFG_CMD, sizeof bind_cmd) < 0
        || nflog_config(fd, group, AF_UNSPEC, &mode, NFULA_CFG_MODE, sizeof mode) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

int cubicle_nflog_read(int fd, struct cubicle_denial *out, int max) {
    char buf[16384];
    ssize_t n;
    do { n = recv(fd, buf, sizeof buf, 0); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    int count = 0;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned)n) && count < max; h = NLMSG_NEXT(h, n)) {
        if (h->nlmsg_type != ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)) continue;
        int len = (int)h->nlmsg_len - NLMSG_LENGTH(sizeof(struct nfgenmsg));
        struct rtattr *a = (struct rtattr *)((char *)NLMSG_DATA(h) + NLMSG_ALIGN(sizeof(struct nfgenmsg)));
        for (; RTA_OK(a, len); a = RTA_NEXT(a, len)) {
            if ((a->rta_type & 0x7fff) != NFULA_PAYLOAD) continue;
            const unsigned char *p = RTA_DATA(a);
            size_t plen = RTA_PAYLOAD(a);
            if (plen < 20 || (p[0] >> 4) != 4) break;
            size_t ihl = (size_t)(p[0] & 15) * 4;
            struct cubicle_denial *d = &out[count++];
            memset(d, 0, sizeof *d);
            memcpy(&d->source_be, p + 12, 4);
            memcpy(&d->destination_be, p + 16, 4);
            d->protocol = p[9];
            if ((d->protocol == IPPROTO_TCP || d->protocol == IPPROTO_UDP) && plen >= ihl + 4 && ihl >= 20)
                d->port = (uint16_t)(p[ihl + 2] << 8 | p[ihl + 3]);
            break;
        }
    }
    return count;
}
