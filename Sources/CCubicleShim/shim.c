#define _GNU_SOURCE
#include "cubicle_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/close_range.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <linux/securebits.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Everything a child runs between clone/fork and exec below is async-signal-safe: raw syscalls only,
 * no malloc, no locks, no stdio. A failure is written as {step, errno} to a CLOEXEC pipe, so the
 * parent reads either EOF (exec happened) or exactly one error record. */

static void child_fail_at(int fd, int step, int index) {
    cubicle_spawn_error e = {step, errno, index};
    ssize_t n;
    do { n = write(fd, &e, sizeof e); } while (n < 0 && errno == EINTR);
    _exit(127);
}

static void child_fail(int fd, int step) {
    cubicle_spawn_error e = {step, errno, -1};
    ssize_t n;
    do { n = write(fd, &e, sizeof e); } while (n < 0 && errno == EINTR);
    _exit(127);
}

void cubicle_default_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < _NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        (void)sigaction(sig, &sa, NULL); /* glibc-internal signals fail with EINVAL; harmless */
    }
}

static void unblock_signals(void) {
    sigset_t none;
    sigemptyset(&none);
    (void)syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, _NSIG / 8);
}

/* Moves fds[i] to target+i. Each source is first duplicated above every target, so a source that
 * already sits on some target slot is never clobbered, and dup2 clears CLOEXEC on the result. */
static int place_fds(const int *fds, int nfds, int target) {
    int tmp[64];
    if (nfds > 64) { errno = EINVAL; return -1; }
    for (int i = 0; i < nfds; i++) {
        tmp[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, target + nfds);
        if (tmp[i] < 0) return -1;
    }
    for (int i = 0; i < nfds; i++) {
        if (dup2(tmp[i], target + i) < 0) return -1;
    }
    return 0;
}

struct sandbox_child_args {
    const cubicle_sandbox_spawn *spawn;
    int sync_fd;
    int err_fd;
};

/* The child's steps up to the point where it is init: sources opened, the parent's go awaited, cgroup
 * joined, root in its namespace, descriptors placed and every other one CLOEXEC, signals default and
 * unblocked. Returns the error pipe, moved above the placed descriptors. */
static int sandbox_child_setup(const struct sandbox_child_args *a, int fork) {
    const cubicle_sandbox_spawn *spawn = a->spawn;
    int errfd = a->err_fd;
    /* The parent's thread kept its capabilities through a changed effective uid for the clone; nothing in
     * the sandbox keeps that. The child holds CAP_SETPCAP in its new user namespace. */
    if (spawn->userns_owner != 0) {
        int bits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
        if (bits < 0 || prctl(PR_SET_SECUREBITS, bits & ~SECBIT_NO_SETUID_FIXUP, 0, 0, 0) < 0)
            child_fail(errfd, CUBICLE_STEP_USERNS_OWNER);
    }
    /* A copy of the fork server has its dispositions, all default (it sets them so when it starts). */
    if (!fork) cubicle_default_signals();
    int all[64];
    int nall = spawn->nfds + spawn->nsources;
    if (nall > 64) { errno = EMFILE; child_fail(errfd, CUBICLE_STEP_DUP_FDS); }
    for (int i = 0; i < spawn->nfds; i++) all[i] = spawn->fds[i];
    for (int i = 0; i < spawn->nsources; i++) {
        all[spawn->nfds + i] = open(spawn->sources[i], O_PATH | O_CLOEXEC);
        if (all[spawn->nfds + i] < 0) child_fail_at(errfd, CUBICLE_STEP_OPEN_SOURCE, i);
    }
    /* init reports over its control socket; the daemon's stdio is a host descriptor it must not hold. */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) child_fail(errfd, CUBICLE_STEP_DUP_FDS);
    for (int i = 0; i < 3; i++) if (dup2(devnull, i) < 0) child_fail(errfd, CUBICLE_STEP_DUP_FDS);
    /* The opens above overlap the parent's map and cgroup writes; what follows needs both done. */
    char go;
    ssize_t n;
    do { n = read(a->sync_fd, &go, 1); } while (n < 0 && errno == EINTR);
    if (n != 1) _exit(126); /* the parent gave up on us before the maps were written */
    for (int i = 0; i < spawn->ncgroup_task_fds; i++) {
        ssize_t w;
        do { w = write(spawn->cgroup_task_fds[i], "0", 1); } while (w < 0 && errno == EINTR);
        if (w != 1) child_fail(errfd, CUBICLE_STEP_JOIN_CGROUP);
    }
    if (spawn->unshare_cgroup && unshare(CLONE_NEWCGROUP) < 0) child_fail(errfd, CUBICLE_STEP_UNSHARE_CGROUP);
    // Raw syscalls: glibc's wrappers broadcast set*id to every thread it believes exists, and this
    // child of a threaded parent has none of them, so they would wait forever.
    if (syscall(SYS_setgroups, 0, NULL) < 0) child_fail(errfd, CUBICLE_STEP_SETGROUPS);
    if (syscall(SYS_setresgid, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_SETRESGID);
    if (syscall(SYS_setresuid, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_SETRESUID);
    /* A namespace of our own (the pool was empty) gets what a pooled one got; the /proc here is still
     * writable (the host's, or the template scaffold's own), unlike the sandbox's. A failure only costs
     * speed. */
    if (spawn->namespaces & CLONE_NEWNET) (void)cubicle_netns_loopback_congestion_control();
    errfd = fcntl(errfd, F_DUPFD_CLOEXEC, 3 + nall);
    if (errfd < 0) _exit(127);
    if (place_fds(all, nall, 3) < 0) child_fail(errfd, CUBICLE_STEP_DUP_FDS);
    /* Every descriptor we were not asked to pass closes at exec (or below, for a fork), whoever opened it. */
    if (syscall(SYS_close_range, 3 + nall, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        child_fail(errfd, CUBICLE_STEP_DUP_FDS);
    unblock_signals();
    return errfd;
}

/* Runs on its own stack in the parent's address space (CLONE_VM, as posix_spawn does), so there is no
 * page-table copy to make and none to tear down at exec: only its stack and errno are written. */
static int sandbox_child(void *arg) {
    const struct sandbox_child_args *a = arg;
    int errfd = sandbox_child_setup(a, 0);
    execve(a->spawn->path, a->spawn->argv, a->spawn->envp);
    child_fail(errfd, CUBICLE_STEP_EXEC);
    return 127;
}

static int read_exec_result(int error_fd, cubicle_spawn_error *error) {
    cubicle_spawn_error e;
    ssize_t n;
    do { n = read(error_fd, &e, sizeof e); } while (n < 0 && errno == EINTR);
    close(error_fd);
    if (n == 0) return 0;
    if (n == (ssize_t)sizeof e) { *error = e; return -1; }
    error->step = CUBICLE_STEP_SYNC_WAIT; error->err = n < 0 ? errno : EPROTO;
    return -1;
}

static void reap(pid_t pid) {
    int status;
    while (waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {}
}

enum { SANDBOX_CHILD_STACK = 64 * 1024 };

/* The calling thread's securebits before become_userns_owner, plus one (so 0 means nothing to undo). */
static int become_userns_owner(uint32_t owner) {
    int bits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
    if (bits < 0) return -1;
    /* Without the fixup an effective uid other than 0 would empty the effective capability set; kept, the
     * clone stays privileged (Debian's unprivileged_userns_clone and AppArmor's userns restriction do not
     * apply to it) and the child opens bind sources as root would. Raw syscalls: they change this thread
     * alone, where glibc's wrappers would change every thread of the daemon. */
    if (prctl(PR_SET_SECUREBITS, bits | SECBIT_NO_SETUID_FIXUP, 0, 0, 0) < 0) return -1;
    if (syscall(SYS_setresuid, -1, owner, -1) < 0) {
        int saved = errno;
        (void)prctl(PR_SET_SECUREBITS, bits, 0, 0, 0);
        errno = saved;
        return -1;
    }
    (void)syscall(SYS_setfsuid, 0);
    return bits + 1;
}

static void stop_being_userns_owner(int owned) {
    /* Back to euid 0, which the saved uid allows; setfsuid follows the effective uid. A thread left with
     * another identity would serve the daemon with it, so failing here is fatal. */
    if (syscall(SYS_setresuid, -1, 0, -1) < 0 || prctl(PR_SET_SECUREBITS, owned - 1, 0, 0, 0) < 0) {
        static const char msg[] = "cubicle: a thread cannot take back root's identity after a clone\n";
        (void)!write(2, msg, sizeof msg - 1);
        abort();
    }
}

static void return_to_host_netns(int host_netns_fd) {
    for (int i = 0; i < 100; i++) {
        if (setns(host_netns_fd, CLONE_NEWNET) == 0) return;
        if (errno != ENOMEM && errno != EINTR) break;
    }
    static const char msg[] = "cubicle: a thread cannot return to the host's network namespace\n";
    (void)!write(2, msg, sizeof msg - 1);
    abort();
}

/* The child of cubicle_netns_create: in its own user and network namespaces, it brings loopback up, sets
 * the congestion control, says so on the pipe and waits to be killed once the parent has opened its
 * namespace. Nothing it waits for is an end of file: another child cloned meanwhile (by any thread) holds
 * copies of this one's pipes until it execs or dies, so an EOF could be held back indefinitely. */
struct netns_child_args { int ready[2]; pid_t parent; };

static int netns_child(void *arg) {
    struct netns_child_args *a = arg;
    /* The parent's thread is long-lived; if it (or the process) dies first, so does this child. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != a->parent) _exit(1);
    char status = cubicle_loopback_up() == 0 ? 0 : (char)errno;
    if (status == 0) (void)cubicle_netns_loopback_congestion_control();
    if (write(a->ready[1], &status, 1) != 1) _exit(1);
    for (;;) pause();
}

int cubicle_netns_create(void) {
    /* Made by a child in a user namespace of its own (owned by us, so we hold every capability over it),
     * not by unshare on this thread: the kernel broadcasts untagged uevents (host device activity) to
     * every network namespace owned by the host's user namespace, and a sandbox given one of those could
     * listen to them. A CLONE_VM child on a small stack, as posix_spawn does: no page tables to copy. */
    struct netns_child_args a;
    a.parent = getpid();
    if (pipe2(a.ready, O_CLOEXEC) < 0) return -1;
    enum { STACK = 64 * 1024 };
    void *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    int fd = -1, saved = 0, write_end_open = 1;
    pid_t pid = -1;
    if (stack == MAP_FAILED) { saved = errno; goto out; }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = clone(netns_child, (char *)stack + STACK, CLONE_VM | CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD, &a);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) goto out;
    saved = 0;
    /* Ours closed, so a child that dies before writing is an EOF here (once no other clone holds a copy).
     * `a` is the child's memory too (CLONE_VM): it is not written after the clone. */
    close(a.ready[1]);
    write_end_open = 0;
    char status = 1;
    ssize_t n;
    do { n = read(a.ready[0], &status, 1); } while (n < 0 && errno == EINTR);
    if (n != 1) { saved = EPROTO; goto out; }
    if (status != 0) { saved = status; goto out; }
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/net", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) saved = errno;
out:
    close(a.ready[0]);
    if (write_end_open) close(a.ready[1]);
    if (pid > 0) { kill(pid, SIGKILL); reap(pid); }
    if (stack != MAP_FAILED) munmap(stack, STACK);
    errno = saved;
    return fd;
}

/* Both ways to make a sandbox's init. exec: from the threaded daemon, a CLONE_VM child on its own stack
 * that execs cubicle-init. fork: from the single-threaded fork server, a copy of it (CLONE_PARENT, so the
 * daemon is the parent) that returns here as 0 and goes on to serve as init without an exec. */
static pid_t sandbox_start(const cubicle_sandbox_spawn *spawn, cubicle_sandbox_prepare prepare, void *context,
                           cubicle_spawn_error *error, int fork, pid_t *unreaped) {
    error->step = CUBICLE_STEP_NONE; error->err = 0; error->index = -1;
    if (unreaped) *unreaped = 0;
    int sync_pipe[2], err_pipe[2];
    if (pipe2(sync_pipe, O_CLOEXEC) < 0) {
        error->step = CUBICLE_STEP_PIPE; error->err = errno; return -1;
    }
    if (pipe2(err_pipe, O_CLOEXEC) < 0) {
        error->step = CUBICLE_STEP_PIPE; error->err = errno;
        close(sync_pipe[0]); close(sync_pipe[1]); return -1;
    }
    void *stack = NULL;
    if (!fork) {
        stack = mmap(NULL, SANDBOX_CHILD_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            error->step = CUBICLE_STEP_CLONE; error->err = errno;
            close(sync_pipe[0]); close(sync_pipe[1]); close(err_pipe[0]); close(err_pipe[1]);
            return -1;
        }
    }
    struct sandbox_child_args args = {spawn, sync_pipe[0], err_pipe[1]};
    if (spawn->netns_fd >= 0 && setns(spawn->netns_fd, CLONE_NEWNET) < 0) {
        error->step = CUBICLE_STEP_SETNS_NET; error->err = errno;
        close(sync_pipe[0]); close(sync_pipe[1]); close(err_pipe[0]); close(err_pipe[1]);
        if (stack) munmap(stack, SANDBOX_CHILD_STACK);
        return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int owned = 0;
    if (spawn->userns_owner != 0 && (owned = become_userns_owner(spawn->userns_owner)) < 0) {
        error->step = CUBICLE_STEP_USERNS_OWNER; error->err = errno;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (spawn->netns_fd >= 0) return_to_host_netns(spawn->host_netns_fd);
        close(sync_pipe[0]); close(sync_pipe[1]); close(err_pipe[0]); close(err_pipe[1]);
        if (stack) munmap(stack, SANDBOX_CHILD_STACK);
        return -1;
    }
    pid_t pid;
    if (fork) {
        /* A raw clone, as glibc's fork takes no namespace flags. The child's copy of glibc keeps the fork
         * server's thread id in its thread block; init never signals threads by it (Chromium's zygote
         * forks the same way). */
        pid = (pid_t)syscall(SYS_clone, (unsigned long)(spawn->namespaces | CLONE_PARENT | SIGCHLD), NULL, NULL, NULL, NULL);
        if (pid == 0) {
            (void)sandbox_child_setup(&args, 1);
            /* Closes the error pipe too: the parent reads EOF, as it does at an exec. */
            (void)syscall(SYS_close_range, 3 + spawn->nfds + spawn->nsources, ~0U, 0);
            return 0;
        }
    } else {
        pid = clone(sandbox_child, (char *)stack + SANDBOX_CHILD_STACK, spawn->namespaces | CLONE_VM | SIGCHLD, &args);
    }
    int saved = errno;
    if (owned) stop_being_userns_owner(owned);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (spawn->netns_fd >= 0) return_to_host_netns(spawn->host_netns_fd);
    close(sync_pipe[0]);
    close(err_pipe[1]);
    if (pid < 0) {
        error->step = CUBICLE_STEP_CLONE; error->err = saved;
        close(sync_pipe[1]); close(err_pipe[0]);
        if (stack) munmap(stack, SANDBOX_CHILD_STACK);
        return -1;
    }
    int failed = 0;
    if (prepare(context, pid) != 0) {
        error->step = CUBICLE_STEP_PREPARE; error->err = 0;
        failed = 1;
    } else {
        char go = 1;
        ssize_t n;
        do { n = write(sync_pipe[1], &go, 1); } while (n < 0 && errno == EINTR);
        if (n != 1) { error->step = CUBICLE_STEP_SYNC_WAIT; error->err = errno; failed = 1; }
    }
    close(sync_pipe[1]); /* a child still waiting reads EOF and exits */
    if (failed) {
        close(err_pipe[0]);
    } else {
        /* EOF means exec replaced the child's address space (it no longer runs on our stack), or the forked
         * child finished its steps. */
        failed = read_exec_result(err_pipe[0], error) != 0;
    }
    if (failed) {
        kill(pid, SIGKILL);
        /* A forked child is the daemon's, not ours, to reap. */
        if (fork) *unreaped = pid; else reap(pid);
    }
    if (stack) munmap(stack, SANDBOX_CHILD_STACK);
    return failed ? -1 : pid;
}

pid_t cubicle_sandbox_spawn_run(const cubicle_sandbox_spawn *spawn, cubicle_sandbox_prepare prepare, void *context,
                                cubicle_spawn_error *error) {
    return sandbox_start(spawn, prepare, context, error, 0, NULL);
}

pid_t cubicle_sandbox_fork(const cubicle_sandbox_spawn *spawn, cubicle_sandbox_prepare prepare, void *context,
                           cubicle_spawn_error *error, pid_t *unreaped) {
    return sandbox_start(spawn, prepare, context, error, 1, unreaped);
}

pid_t cubicle_process_spawn_run(const cubicle_process_spawn *s, cubicle_spawn_error *error) {
    int err_pipe[2];
    error->step = CUBICLE_STEP_NONE; error->err = 0;
    if (pipe2(err_pipe, O_CLOEXEC) < 0) {
        error->step = CUBICLE_STEP_PIPE; error->err = errno; return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    pid_t pid = (pid_t)syscall(SYS_clone, (unsigned long)SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0) {
        int errfd = err_pipe[1];
        cubicle_default_signals();
        if (s->new_session && setsid() < 0) child_fail(errfd, CUBICLE_STEP_SETSID);
        errfd = fcntl(errfd, F_DUPFD_CLOEXEC, 3);
        if (errfd < 0) _exit(127);
        int stdio[3] = {s->stdin_fd, s->stdout_fd, s->stderr_fd};
        if (place_fds(stdio, 3, 0) < 0) child_fail(errfd, CUBICLE_STEP_DUP_FDS);
        if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) child_fail(errfd, CUBICLE_STEP_DUP_FDS);
        /* A shell's terminal: job control (Ctrl-C to the foreground group, not to us) needs it to be the
         * controlling terminal of the session setsid() just made. */
        if (s->controlling_tty && ioctl(0, TIOCSCTTY, 0) < 0) child_fail(errfd, CUBICLE_STEP_CONTROLLING_TTY);
        if (s->cwd && chdir(s->cwd) < 0) child_fail(errfd, CUBICLE_STEP_CHDIR);
        for (int i = 0; i < s->nrlimits; i++) {
            struct rlimit rl = {(rlim_t)s->rlimits[i].soft, (rlim_t)s->rlimits[i].hard};
            if (setrlimit(s->rlimits[i].resource, &rl) < 0) child_fail(errfd, CUBICLE_STEP_RLIMIT);
        }
        /* Empty the bounding set while we still hold CAP_SETPCAP; EINVAL marks the kernel's last cap. */
        for (int cap = 0; cap < 64; cap++) {
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
                if (errno == EINVAL) break;
                child_fail(errfd, CUBICLE_STEP_CAPBSET);
            }
        }
        /* A dead init ends the session, so the agent and commands, which use the memory, are the OOM
         * killer's choice before init: they raise their score to CUBICLE_CHILD_OOM_SCORE_ADJ. Raising
         * one's own score needs no privilege (lowering below the floor a privileged writer set does), so
         * this holds whether or not the host could also lower init's (SandboxLauncher).
         * /proc/self is ours to write only while this copy of init is dumpable: init is not (its
         * credentials changed), so its files belong to a root this namespace does not map. The
         * credential changes below make it undumpable again. */
        if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_OOM_SCORE_ADJ);
        int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (oom < 0 || write(oom, CUBICLE_CHILD_OOM_SCORE_ADJ, strlen(CUBICLE_CHILD_OOM_SCORE_ADJ)) < 0)
            child_fail(errfd, CUBICLE_STEP_OOM_SCORE_ADJ);
        close(oom);
        if (syscall(SYS_setgroups, 0, NULL) < 0) child_fail(errfd, CUBICLE_STEP_SETGROUPS);
        if (syscall(SYS_setresgid, s->gid, s->gid, s->gid) < 0) child_fail(errfd, CUBICLE_STEP_SETRESGID);
        if (syscall(SYS_setresuid, s->uid, s->uid, s->uid) < 0) child_fail(errfd, CUBICLE_STEP_SETRESUID);
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_CAPS);
        struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[2];
        memset(data, 0, sizeof data);
        if (syscall(SYS_capset, &hdr, data) < 0) child_fail(errfd, CUBICLE_STEP_CAPS);
        /* Credentials changed above, which clears the death signal, so it is set after them. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_PDEATHSIG);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_NO_NEW_PRIVS);
        if (s->seccomp_filter && s->seccomp_len > 0) {
            struct sock_fprog prog = {s->seccomp_len, (struct sock_filter *)s->seccomp_filter};
            if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0) child_fail(errfd, CUBICLE_STEP_SECCOMP);
        }
        unblock_signals();
        execve(s->path, s->argv, s->envp);
        child_fail(errfd, CUBICLE_STEP_EXEC);
    }
    int saved = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    close(err_pipe[1]);
    if (pid < 0) {
        close(err_pipe[0]);
        error->step = CUBICLE_STEP_CLONE; error->err = saved;
        return -1;
    }
    /* On failure error->step is set and the caller still reaps pid. */
    (void)read_exec_result(err_pipe[0], error);
    return pid;
}

int cubicle_open_pty(uint16_t rows, uint16_t cols, uint32_t uid, uint32_t gid, int *master, int *peer) {
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    /* TIOCGPTPEER opens the peer through the master, never by a path another process could swap. */
    int p = -1;
    struct winsize size = {rows, cols, 0, 0};
    if (unlockpt(m) < 0 || (p = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 ||
        fchown(p, uid, gid) < 0 || fchmod(p, 0620) < 0 || ioctl(m, TIOCSWINSZ, &size) < 0) {
        int saved = errno;
        if (p >= 0) close(p);
        close(m);
        errno = saved;
        return -1;
    }
    *master = m;
    *peer = p;
    return 0;
}

int cubicle_set_window_size(int fd, uint16_t rows, uint16_t cols) {
    struct winsize size = {rows, cols, 0, 0};
    return ioctl(fd, TIOCSWINSZ, &size);
}

int cubicle_mount_setattr_readonly(const char *path, int nodev) {
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (nodev ? MOUNT_ATTR_NODEV : 0);
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE | AT_SYMLINK_NOFOLLOW, &attr, sizeof attr);
}

int cubicle_mount_setattr_available(void) {
    /* An invalid flag: EINVAL where the call exists, ENOSYS where it does not. */
    return !(syscall(SYS_mount_setattr, -1, "", 0x80000000U, NULL, 0) < 0 && errno == ENOSYS);
}

int cubicle_file_identity_of(int dirfd, const char *path, cubicle_file_identity *out) {
    struct statx st;
    int flags = path[0] == 0 ? AT_EMPTY_PATH : 0;
    if (syscall(SYS_statx, dirfd, path, flags, STATX_INO | 0x1000U /* STATX_MNT_ID */, &st) < 0) return -1;
    out->dev = ((uint64_t)st.stx_dev_major << 32) | st.stx_dev_minor;
    out->ino = st.stx_ino;
    out->mnt_id = (st.stx_mask & 0x1000U) ? st.stx_mnt_id : 0;
    out->mount_root = (st.stx_attributes_mask & 0x2000U /* STATX_ATTR_MOUNT_ROOT */) ? ((st.stx_attributes & 0x2000U) != 0) : -1;
    return 0;
}

int cubicle_unshare_mounts(void) {
    return unshare(CLONE_NEWNS);
}

int cubicle_enter_mounts(int ns_fd) {
    return setns(ns_fd, CLONE_NEWNS);
}

int cubicle_pivot_root(const char *new_root, const char *put_old) {
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

/* BBR, a common host default, paces each connection with timers; on a loopback with no link to share
 * that only costs the sender CPU (it doubled cubicled's time in a 100 MB echo). A new namespace takes the
 * host's default, so its loopback is set to CUBIC, or Reno where CUBIC is not allowed: a namespace other
 * than the host's may only default to what tcp_allowed_congestion_control lists, whatever our capabilities.
 * Only the namespace of the calling thread is changed (/proc/sys/net follows it). */
int cubicle_netns_loopback_congestion_control(void) {
    static const char *const names[] = {"cubic", "reno"};
    int fd = open("/proc/sys/net/ipv4/tcp_congestion_control", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = -1;
    for (unsigned i = 0; i < sizeof names / sizeof names[0] && rc < 0; i++) {
        if (write(fd, names[i], strlen(names[i])) >= 0) rc = 0;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int cubicle_loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    /* Up already in a namespace the host made ahead of time, which init has no rights to change. */
    if (rc == 0 && !(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int saved = errno;
    close(s);
    errno = saved;
    return rc;
}

int cubicle_pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int cubicle_pidfd_alive(int pidfd) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0);
}

int cubicle_fs_usage_of(int fd, cubicle_fs_usage *out) {
    struct statfs fs;
    if (fstatfs(fd, &fs) < 0) return -1;
    out->type = (int64_t)fs.f_type;
    out->used_bytes = (int64_t)(fs.f_blocks - fs.f_bfree) * (int64_t)fs.f_bsize;
    out->used_inodes = (int64_t)fs.f_files - (int64_t)fs.f_ffree;
    return 0;
}

int64_t cubicle_seek_data(int fd, int64_t from) {
    return (int64_t)lseek(fd, (off_t)from, SEEK_DATA);
}

int64_t cubicle_seek_hole(int fd, int64_t from) {
    return (int64_t)lseek(fd, (off_t)from, SEEK_HOLE);
}

int cubicle_open_in_root(int root_fd, const char *path, int flags) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    return (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
}

void cubicle_close_from(int first_fd) {
    (void)syscall(SYS_close_range, (unsigned)first_fd, ~0U, 0);
}

int cubicle_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int cubicle_signalfd(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0) return -1;
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

int cubicle_read_signal(int fd) {
    struct signalfd_siginfo info;
    ssize_t n;
    do { n = read(fd, &info, sizeof info); } while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof info ? (int)info.ssi_signo : 0;
}

int cubicle_set_no_new_privs(void) {
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

ssize_t cubicle_send_with_fds(int sock, const void *data, size_t len, const int *fds, int nfds, int flags) {
    struct iovec iov = {(void *)data, len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
        char buf[CMSG_SPACE(sizeof(int) * 16)];
        struct cmsghdr align;
    } control;
    if (nfds > 16) { errno = EINVAL; return -1; }
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do { n = sendmsg(sock, &msg, flags | MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n;
}

ssize_t cubicle_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *ctrunc, int flags) {
    struct iovec iov = {buf, len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
        char buf[CMSG_SPACE(sizeof(int) * 16)];
        struct cmsghdr align;
    } control;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    int capacity = *nfds;
    *nfds = 0;
    *ctrunc = 0;
    ssize_t n;
    do { n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    if (msg.msg_flags & MSG_CTRUNC) *ctrunc = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *incoming = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < capacity) fds[(*nfds)++] = incoming[i];
            else { close(incoming[i]); *ctrunc = 1; } /* never leak what we cannot hand up */
        }
    }
    return n;
}

/* An image layer for one sandbox: a detached copy of the layer's directory (open_tree), read-only, no
 * devices, and idmapped through the sandbox's user namespace, so the layer's on-disk owners (0, 1000...)
 * are seen inside as the sandbox's own 0, 1000... without a chown. */
#ifndef MOUNT_ATTR_IDMAP
#define MOUNT_ATTR_IDMAP 0x00100000
#endif
struct cubicle_mount_attr { unsigned long long attr_set, attr_clr, propagation, userns_fd; };

int cubicle_idmapped_tree(const char *path, int userns_fd) {
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path, 1 /* OPEN_TREE_CLONE */ | O_CLOEXEC | AT_SYMLINK_NOFOLLOW);
    if (fd < 0) return -1;
    struct cubicle_mount_attr attr = { .attr_set = MOUNT_ATTR_IDMAP | 0x1 /* RDONLY */ | 0x4 /* NODEV */ | 0x2 /* NOSUID */,
                                       .userns_fd = (unsigned long long)userns_fd };
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* Attaches a detached mount (from cubicle_idmapped_tree, received over the control socket) at target. */
int cubicle_move_mount_to(int fd, const char *target) {
    return (int)syscall(SYS_move_mount, fd, "", AT_FDCWD, target, 0x4 /* MOVE_MOUNT_F_EMPTY_PATH */);
}

/* A free loop device bound to backing_fd (read-write, LO_FLAGS_AUTOCLEAR: it detaches itself once its last
 * opener closes it and nothing is mounted from it). Returns the loop device's open descriptor, its number
 * in *index. LOOP_CTL_GET_FREE and LOOP_CONFIGURE are two steps, so another process may take the device in
 * between (EBUSY): the next free one is tried, a bounded number of times. */
#include <linux/loop.h>
int cubicle_loop_attach(int backing_fd, int *index) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return -1;
    for (int attempt = 0; attempt < 64; attempt++) {
        int n = ioctl(control, LOOP_CTL_GET_FREE);
        if (n < 0) { int e = errno; close(control); errno = e; return -1; }
        char path[32];
        snprintf(path, sizeof path, "/dev/loop%d", n);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT || errno == ENXIO) continue;
            int e = errno; close(control); errno = e; return -1;
        }
        struct loop_config config;
        memset(&config, 0, sizeof config);
        config.fd = (unsigned)backing_fd;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        if (ioctl(fd, LOOP_CONFIGURE, &config) == 0) {
            close(control);
            *index = n;
            return fd;
        }
        int e = errno;
        close(fd);
        if (e != EBUSY) { close(control); errno = e; return -1; }
    }
    close(control);
    errno = EBUSY;
    return -1;
}

/* syncfs(2) and a whole-file hole punch, which Swift's Glibc module does not import (_GNU_SOURCE). */
int cubicle_syncfs(int fd) { return syncfs(fd); }

int cubicle_punch_hole(int fd, long long length) {
    return fallocate(fd, 0x02 /* FALLOC_FL_PUNCH_HOLE */ | 0x01 /* FALLOC_FL_KEEP_SIZE */, 0, (off_t)length);
}

/* A session's storage, mounted at host_path, attached at target inside the running sandbox whose init is
 * init_pid: a detached copy of the mount (open_tree), idmapped through the sandbox's user namespace (the
 * volume's on-disk owners 0, 1000... are the sandbox's own), without setuid or devices, moved into the
 * sandbox's mount namespace by a child that joins it (setns on a mount namespace needs a single thread).
 * Returns 0, or -1 and errno (the step in *step: 1 open namespaces, 2 open_tree, 3 idmap, 4 fork, 5 setns,
 * 6 move_mount). */
int cubicle_mount_into_sandbox(int init_pid, const char *host_path, const char *target, int *step) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/user", init_pid);
    int userns = open(path, O_RDONLY | O_CLOEXEC);
    snprintf(path, sizeof path, "/proc/%d/ns/mnt", init_pid);
    int mntns = open(path, O_RDONLY | O_CLOEXEC);
    if (userns < 0 || mntns < 0) {
        int e = errno;
        if (userns >= 0) close(userns);
        if (mntns >= 0) close(mntns);
        *step = 1; errno = e; return -1;
    }
    int result = -1, e = 0;
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, host_path, 1 /* OPEN_TREE_CLONE */ | O_CLOEXEC | AT_SYMLINK_NOFOLLOW);
    if (tree < 0) { *step = 2; e = errno; goto out; }
    struct cubicle_mount_attr attr = { .attr_set = MOUNT_ATTR_IDMAP | 0x4 /* NODEV */ | 0x2 /* NOSUID */,
                                       .userns_fd = (unsigned long long)userns };
    if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) { *step = 3; e = errno; goto out; }
    pid_t child = fork();
    if (child < 0) { *step = 4; e = errno; goto out; }
    if (child == 0) {
        if (setns(mntns, CLONE_NEWNS) < 0) _exit(100 + 5);
        if (syscall(SYS_move_mount, tree, "", AT_FDCWD, target, 0x4 /* MOVE_MOUNT_F_EMPTY_PATH */) < 0) _exit(errno == 0 ? 1 : (errno & 0x3f) );
        _exit(0);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) { result = 0; goto out; }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 105) { *step = 5; e = EPERM; goto out; }
    *step = 6;
    e = WIFEXITED(status) ? WEXITSTATUS(status) : EIO;
out:
    if (tree >= 0) close(tree);
    close(userns);
    close(mntns);
    if (result < 0) errno = e;
    return result;
}
