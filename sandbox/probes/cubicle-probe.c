/* Probes the tests run inside sandboxes, one claim each; and a hostile stand-in for cubicle-init.
 *   cubicle-probe syscalls        try each syscall the seccomp profile must deny; print "name errno"
 *   cubicle-probe hold SECONDS    keep a canary from the environment in memory, then sleep
 *   cubicle-probe abstract MINE THEIRS [hold]   bind @MINE, print the errno of connecting to @THEIRS
 *   cubicle-probe hostile-init MODE   act as init on fd 3: garbage | oversize | badfd | nofds | slow
 *   cubicle-probe exhaust SECONDS   take per-user kernel quotas until refused (inotify instances, message
 *                                 queues, queued RT signals), print "inotify N mqueue N signals N", hold them
 *   cubicle-probe quotas          try one of each; print "inotify ERRNO mqueue ERRNO signals ERRNO"
 *   cubicle-probe files PROCS SECONDS   PROCS processes each open /dev/null until refused; print
 *                                 "files TOTAL errno E" (E: the last refusal's), hold them
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <mqueue.h>
#include <sys/inotify.h>
#include <sys/wait.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    printf("%s %d\n", name, rc < 0 ? errno : 0);
}

static int syscalls(void) {
    report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    report("add_key", syscall(SYS_add_key, "user", "cubicle", "x", 1, KEY_SPEC_SESSION_KEYRING));
    report("request_key", syscall(SYS_request_key, "user", "cubicle", NULL, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */));
    char params[120] = {0};
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, params));
    char attr[128] = {0};
    report("bpf", syscall(SYS_bpf, 0, attr, sizeof attr));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("finit_module", syscall(SYS_finit_module, -1, "", 0));
    report("mount", mount("tmpfs", "/tmp", "tmpfs", 0, NULL));
    report("umount2", umount2("/tmp", MNT_DETACH));
    report("unshare", unshare(CLONE_NEWUSER));
    report("setns", setns(0, 0));
    report("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, 0));
    report("socket_vsock", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    report("socket_packet", socket(17 /* AF_PACKET */, SOCK_RAW, 0));
    report("ptrace", syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0));
    report("pivot_root", syscall(SYS_pivot_root, "/", "/"));
    report("chroot", chroot("/"));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    /* Allowed ones, so a profile that denies everything fails the test too. */
    report("getpid", getpid());
    int s = socket(AF_INET, SOCK_STREAM, 0);
    report("socket_inet", s);
    return 0;
}

static int hold(int seconds) {
    const char *canary = getenv("CANARY");
    if (!canary) return 2;
    size_t n = strlen(canary);
    /* Many heap copies, so the canary is plainly in process memory, not only in the environment. */
    for (int i = 0; i < 64; i++) {
        char *copy = malloc(n + 1);
        memcpy(copy, canary, n + 1);
    }
    printf("holding\n");
    fflush(stdout);
    sleep(seconds);
    return 0;
}

static int abstract_socket(const char *mine, const char *theirs, int hold_after) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    a.sun_path[0] = 0;
    strncpy(a.sun_path + 1, mine, sizeof a.sun_path - 2);
    socklen_t len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(mine);
    if (bind(s, (struct sockaddr *)&a, len) < 0 || listen(s, 1) < 0) { printf("bind %d\n", errno); return 1; }
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un b = {.sun_family = AF_UNIX};
    strncpy(b.sun_path + 1, theirs, sizeof b.sun_path - 2);
    socklen_t blen = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(theirs);
    int rc = connect(c, (struct sockaddr *)&b, blen);
    printf("connect %d\n", rc < 0 ? errno : 0);
    fflush(stdout);
    if (hold_after) sleep(60);
    return 0;
}

static void write_frame(const char *json) {
    uint32_t n = (uint32_t)strlen(json);
    unsigned char h[4] = {n >> 24, n >> 16, n >> 8, n};
    (void)!write(3, h, 4);
    (void)!write(3, json, n);
}

static void send_fd_frame(const char *json, int fd) {
    uint32_t n = (uint32_t)strlen(json);
    unsigned char buf[4096];
    buf[0] = n >> 24; buf[1] = n >> 16; buf[2] = n >> 8; buf[3] = n;
    memcpy(buf + 4, json, n);
    struct iovec iov = {buf, n + 4};
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        msg.msg_control = ctl.b;
        msg.msg_controllen = sizeof ctl.b;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    (void)!sendmsg(3, &msg, 0);
}

/* Reads frames until one carries an id; returns it (the host's first request after ready). */
static long read_request_id(void) {
    static char buf[1 << 20];
    for (;;) {
        unsigned char h[4];
        if (read(3, h, 4) != 4) exit(0);
        uint32_t n = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
        if (n >= sizeof buf) exit(0);
        size_t got = 0;
        while (got < n) { ssize_t r = read(3, buf + got, n - got); if (r <= 0) exit(0); got += r; }
        buf[n] = 0;
        char *id = strstr(buf, "\"id\":");
        if (id) return strtol(id + 5, NULL, 10);
    }
}

static int hostile_init(const char *mode) {
    unsigned char h[4];
    char skip[65536];
    if (read(3, h, 4) != 4) return 1;  /* the configure frame */
    uint32_t n = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
    while (n > 0) { ssize_t r = read(3, skip, n < sizeof skip ? n : sizeof skip); if (r <= 0) return 1; n -= r; }
    if (strcmp(mode, "garbage") == 0) {
        write_frame("{\"jsonrpc\":\"2.0\",\"method\":\"ready\",\"params\":{}}");
        read_request_id();
        (void)!write(3, "\x00\x00\x00\x10this is not json", 20);
    } else if (strcmp(mode, "oversize") == 0) {
        write_frame("{\"jsonrpc\":\"2.0\",\"method\":\"ready\",\"params\":{}}");
        read_request_id();
        (void)!write(3, "\x7f\xff\xff\xff", 4);
    } else if (strcmp(mode, "badfd") == 0 || strcmp(mode, "nofds") == 0) {
        write_frame("{\"jsonrpc\":\"2.0\",\"method\":\"ready\",\"params\":{}}");
        long id = read_request_id();
        char json[256];
        snprintf(json, sizeof json, "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"result\":{},\"fds\":1}", id);
        send_fd_frame(json, strcmp(mode, "badfd") == 0 ? open("/proc/self/exe", O_RDONLY) : -1);
    } else if (strcmp(mode, "slow") == 0) {
        /* never says ready */
    } else {
        write_frame("{\"jsonrpc\":\"2.0\",\"method\":\"ready\",\"params\":{}}");
    }
    pause();
    return 0;
}

/* One message queue of the default size (about 80 KiB of RLIMIT_MSGQUEUE); the name carries the pid. */
static mqd_t open_queue(int i) {
    char name[64];
    snprintf(name, sizeof name, "/cubicle-probe-%d-%d", (int)getpid(), i);
    struct mq_attr attr = {.mq_maxmsg = 10, .mq_msgsize = 8192};
    mqd_t q = mq_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600, &attr);
    if (q != (mqd_t)-1) mq_unlink(name); /* held by the descriptor alone */
    return q;
}

static int queue_signal(void) {
    union sigval v = {.sival_int = 1};
    return sigqueue(getpid(), SIGRTMIN, v);
}

static int exhaust(int seconds) {
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &rt, NULL);
    long inotify = 0, mqueue = 0, signals = 0;
    while (inotify < 100000 && inotify_init1(IN_CLOEXEC) >= 0) inotify++;
    while (mqueue < 100000 && open_queue((int)mqueue) != (mqd_t)-1) mqueue++;
    while (signals < 10000000 && queue_signal() == 0) signals++;
    printf("inotify %ld mqueue %ld signals %ld\n", inotify, mqueue, signals);
    fflush(stdout);
    sleep(seconds);
    return 0;
}

static int quotas(void) {
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &rt, NULL);
    int fd = inotify_init1(IN_CLOEXEC);
    int inotify_errno = fd < 0 ? errno : 0;
    mqd_t q = open_queue(0);
    int mqueue_errno = q == (mqd_t)-1 ? errno : 0;
    int signal_errno = queue_signal() < 0 ? errno : 0;
    printf("inotify %d mqueue %d signals %d\n", inotify_errno, mqueue_errno, signal_errno);
    return 0;
}

static int files(int procs, int seconds) {
    int report[2];
    if (pipe(report) < 0) return 1;
    int children = 0;
    for (int i = 0; i < procs; i++) {
        pid_t pid = fork();
        if (pid < 0) break;
        children++;
        if (pid == 0) {
            long n = 0;
            while (open("/dev/null", O_RDONLY) >= 0) n++;
            long result[2] = {n, errno};
            (void)!write(report[1], result, sizeof result);
            sleep(seconds);
            _exit(0);
        }
    }
    close(report[1]);
    long total = 0, last = 0, result[2];
    while (read(report[0], result, sizeof result) == (ssize_t)sizeof result) {
        total += result[0];
        last = result[1];
        if (--children == 0) break;
    }
    printf("files %ld errno %ld\n", total, last);
    fflush(stdout);
    sleep(seconds);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "syscalls") == 0) return syscalls();
    if (argc >= 3 && strcmp(argv[1], "hold") == 0) return hold(atoi(argv[2]));
    if (argc >= 4 && strcmp(argv[1], "abstract") == 0) return abstract_socket(argv[2], argv[3], argc >= 5);
    if (argc >= 3 && strcmp(argv[1], "hostile-init") == 0) return hostile_init(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "exhaust") == 0) return exhaust(atoi(argv[2]));
    if (argc >= 2 && strcmp(argv[1], "quotas") == 0) return quotas();
    if (argc >= 4 && strcmp(argv[1], "files") == 0) return files(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: cubicle-probe syscalls | hold SECONDS | abstract MINE THEIRS | hostile-init MODE | exhaust SECONDS | quotas | files PROCS SECONDS\n");
    return 2;
}
