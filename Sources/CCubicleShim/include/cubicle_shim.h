#ifndef CUBICLE_SHIM_H
#define CUBICLE_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Steps a child can fail at before exec; reported back with errno over a CLOEXEC pipe. */
enum cubicle_step {
    CUBICLE_STEP_NONE = 0,
    CUBICLE_STEP_PIPE = 1,
    CUBICLE_STEP_CLONE = 2,
    CUBICLE_STEP_SYNC_WAIT = 3,
    CUBICLE_STEP_UNSHARE_CGROUP = 4,
    CUBICLE_STEP_SETGROUPS = 5,
    CUBICLE_STEP_SETRESGID = 6,
    CUBICLE_STEP_SETRESUID = 7,
    CUBICLE_STEP_DUP_FDS = 8,
    CUBICLE_STEP_SETSID = 9,
    CUBICLE_STEP_CHDIR = 10,
    CUBICLE_STEP_RLIMIT = 11,
    CUBICLE_STEP_CAPBSET = 12,
    CUBICLE_STEP_CAPS = 13,
    CUBICLE_STEP_NO_NEW_PRIVS = 14,
    CUBICLE_STEP_SECCOMP = 15,
    CUBICLE_STEP_EXEC = 16,
    CUBICLE_STEP_PDEATHSIG = 17,
    CUBICLE_STEP_OPEN_SOURCE = 18,
    CUBICLE_STEP_PREPARE = 19,
    CUBICLE_STEP_SETNS_NET = 20,
    CUBICLE_STEP_JOIN_CGROUP = 21,
    CUBICLE_STEP_OOM_SCORE_ADJ = 22,
    CUBICLE_STEP_USERNS_OWNER = 23,
    CUBICLE_STEP_CONTROLLING_TTY = 24,
};

/* What every process init starts writes to its oom_score_adj (see cubicle_process_spawn_run). */
#define CUBICLE_CHILD_OOM_SCORE_ADJ "500"

typedef struct {
    int32_t step;
    int32_t err;
    int32_t index;  /* which source, for CUBICLE_STEP_OPEN_SOURCE */
} cubicle_spawn_error;

/* ---- Host side: start cubicle-init in new namespaces. ---- */

typedef struct {
    const char *path;
    char *const *argv;
    char *const *envp;
    int namespaces;          /* CLONE_NEW* flags other than CLONE_NEWCGROUP */
    int unshare_cgroup;      /* unshare(CLONE_NEWCGROUP) after the parent placed us in our cgroup */
    const int *fds;          /* become fds 3, 4, ... in the child; all others are closed */
    int nfds;
    /* Opened O_PATH by the child inside its new mount namespace (a mount from another namespace cannot be
     * bound) and before it takes its mapped uid (it is still host root, so root-only parents are fine).
     * They follow fds: 3 + nfds, 3 + nfds + 1, ... */
    const char *const *sources;
    int nsources;
    /* >= 0: a network namespace made ahead of time (cubicle_netns_create) for the child, and namespaces
     * must lack CLONE_NEWNET. The calling thread enters it for the clone alone and goes back to
     * host_netns_fd; a thread that cannot go back aborts the process rather than serve from a sandbox's
     * network. */
    int netns_fd;
    int host_netns_fd;
    /* cgroup v1 `tasks` files the parent opened (so the kernel checks its credentials, not the child's):
     * the child writes "0" to each, moving itself before it unshares its cgroup namespace. A thread that
     * moves itself skips the global threadgroup lock, whose every write-side entry can wait out an RCU
     * grace period (10-20 ms here) when the parent writes the child's pid to cgroup.procs instead. */
    const int *cgroup_task_fds;
    int ncgroup_task_fds;
    /* Nonzero: the host uid that owns the new user namespace. The kernel charges the per-user quotas of
     * everything inside (inotify instances, message queue bytes, queued signals, namespaces) to the
     * namespace's owner at the host's level, so a namespace owned by root would spend root's. The calling
     * thread takes it as its effective uid for the clone alone (its filesystem uid, its capabilities and
     * its other ids stay root's: SECBIT_NO_SETUID_FIXUP) and the child drops the securebit. 0: the caller
     * owns it. */
    uint32_t userns_owner;
} cubicle_sandbox_spawn;

/* A new network namespace with its loopback up and its congestion control set, owned by a user namespace
 * of its own (so no host uevent reaches it) that the caller holds every capability in. Returns an fd for
 * it, or -1 with errno. */
int cubicle_netns_create(void);

/* Called in the parent while the child waits: write the id maps and, unless the child joins its cgroup
 * through cgroup_task_fds, put it there. Nonzero aborts the spawn. */
typedef int (*cubicle_sandbox_prepare)(void *context, pid_t pid);

/* Clones the child into its namespaces, runs prepare(context, pid) while the child waits, then lets it
 * exec. Returns the pid once exec has happened, or -1 with *error set and no child left (it is killed and
 * reaped); CUBICLE_STEP_PREPARE means prepare failed, and the caller knows why. */
pid_t cubicle_sandbox_spawn_run(const cubicle_sandbox_spawn *spawn, cubicle_sandbox_prepare prepare, void *context,
                                cubicle_spawn_error *error);

/* The fork server's way (see Sources/CubicleInit/ForkServer.swift): the same steps from a single-threaded
 * cubicle-init that clones itself instead of exec'ing, with CLONE_PARENT so the daemon is init's parent.
 * Returns 0 in the child, which is then ready to serve as init (descriptors placed, the rest closed,
 * signals default and unblocked); in the caller the child's pid, or -1 with *error set, in which case a
 * child that was made has been killed and its pid is in *unreaped for the daemon to reap. path, argv and
 * envp are not used. */
pid_t cubicle_sandbox_fork(const cubicle_sandbox_spawn *spawn, cubicle_sandbox_prepare prepare, void *context,
                           cubicle_spawn_error *error, pid_t *unreaped);

/* ---- Inside the sandbox: start the agent or a command with its final identity. ---- */

typedef struct {
    int resource;
    uint64_t soft;
    uint64_t hard;
} cubicle_rlimit;

typedef struct {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int stdin_fd, stdout_fd, stderr_fd;
    uint32_t uid, gid;
    const cubicle_rlimit *rlimits;
    int nrlimits;
    const void *seccomp_filter;  /* struct sock_filter[], or NULL */
    uint16_t seccomp_len;        /* number of instructions */
    int new_session;             /* setsid(): one process group to kill on timeout */
    int controlling_tty;         /* stdin is a terminal: it becomes the new session's controlling terminal */
} cubicle_process_spawn;

/* A pseudo-terminal of the sandbox's own devpts: the master and its peer, both O_CLOEXEC, the terminal
 * sized rows x cols and its peer owned by uid:gid (mode 0620), as a login would leave it. -1 and errno on
 * failure, nothing left open. */
int cubicle_open_pty(uint16_t rows, uint16_t cols, uint32_t uid, uint32_t gid, int *master, int *peer);
/* TIOCSWINSZ on a terminal (its master will do). */
int cubicle_set_window_size(int fd, uint16_t rows, uint16_t cols);

/* Returns -1 when no child was made. Otherwise the pid; error->step is nonzero when the child failed
 * before exec (it has exited and must still be reaped). */
pid_t cubicle_process_spawn_run(const cubicle_process_spawn *spawn, cubicle_spawn_error *error);

/* ---- Syscalls Swift cannot reach or should not make itself. ---- */
int cubicle_pivot_root(const char *new_root, const char *put_old);
/* The mount namespace calls (Swift's Glibc leaves the _GNU_SOURCE ones out). Single-threaded callers only. */
int cubicle_unshare_mounts(void);
int cubicle_enter_mounts(int ns_fd);
/* mount_setattr(2): read-only, nosuid and (with nodev) nodev on the mount at path and every mount below it.
 * ENOSYS before 5.12. */
int cubicle_mount_setattr_readonly(const char *path, int nodev);
int cubicle_mount_setattr_available(void);
/* What a path (or fd, with path "") names: device, inode and the mount it is reached through (0 where
 * statx has no mount id, before 5.8). Follows symlinks, as open does. */
typedef struct {
    uint64_t dev, ino, mnt_id;
    int32_t mount_root;  /* 1: the root of its mount, 0: not, -1: the kernel does not say (before 5.8) */
} cubicle_file_identity;
int cubicle_file_identity_of(int dirfd, const char *path, cubicle_file_identity *out);
int cubicle_loopback_up(void);
int cubicle_netns_loopback_congestion_control(void);
/* Every signal's disposition back to SIG_DFL (async-signal-safe). */
void cubicle_default_signals(void);
int cubicle_set_no_new_privs(void);
int cubicle_pipe_cloexec(int fds[2]);
void cubicle_close_from(int first_fd);
int cubicle_pidfd_open(pid_t pid);
/* 0 while the process behind pidfd has not been reaped (so its pid still names it), -1 (ESRCH) after. */
int cubicle_pidfd_alive(int pidfd);
/* openat2 with RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS: `path` resolved as if
 * root_fd were /, never through a symlink, so a hostile tree cannot send the walk elsewhere. ENOSYS
 * before 5.6. */
int cubicle_open_in_root(int root_fd, const char *path, int flags);
/* fstatfs, reduced to what the wiper needs: the filesystem's magic and what it holds. */
typedef struct {
    int64_t type, used_bytes, used_inodes;
} cubicle_fs_usage;
int cubicle_fs_usage_of(int fd, cubicle_fs_usage *out);
/* lseek SEEK_DATA / SEEK_HOLE (the _GNU_SOURCE whences Swift's Glibc leaves out). */
int64_t cubicle_seek_data(int fd, int64_t from);
int64_t cubicle_seek_hole(int fd, int64_t from);
/* Blocks the given signals and returns a CLOEXEC signalfd for them; read_signal returns the next signo, 0 when none. */
int cubicle_signalfd(const int *signals, int count);
int cubicle_read_signal(int fd);  /* pipe2(O_CLOEXEC), which Swift's Glibc does not export */

/* SCM_RIGHTS. send: data and up to 16 fds in one sendmsg. recv: returns bytes read (0 at EOF, -1 on
 * error); *nfds is in: capacity of fds, out: received. Truncated control data sets *ctrunc. */
ssize_t cubicle_send_with_fds(int sock, const void *data, size_t len, const int *fds, int nfds, int flags);
ssize_t cubicle_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *ctrunc, int flags);

/* A detached, read-only, idmapped copy of `path` for the sandbox whose user namespace is userns_fd. */
int cubicle_idmapped_tree(const char *path, int userns_fd);

/* A free loop device attached to backing_fd, detaching itself when closed and unmounted (LO_FLAGS_AUTOCLEAR):
 * its open descriptor, its number in *index; -1 and errno on failure. */
int cubicle_loop_attach(int backing_fd, int *index);

int cubicle_syncfs(int fd);
/* Gives back every block of the file's first `length` bytes to its file system (FALLOC_FL_PUNCH_HOLE). */
int cubicle_punch_hole(int fd, long long length);

/* The storage mounted at host_path, attached (idmapped, nosuid, nodev) at target inside the sandbox whose
 * init is init_pid. 0, or -1 with errno and the failing step in *step. */
int cubicle_mount_into_sandbox(int init_pid, const char *host_path, const char *target, int *step);
/* Attaches a detached mount at `target` (move_mount). */
int cubicle_move_mount_to(int fd, const char *target);

/* A session's link (netlink.c): a veth pair whose host end `host_name` gets `gateway`/32, is up and routes
 * `session`/32; its peer, eth0 in `netns_fd`, gets `session`/32, is up and routes everything through the
 * gateway. The thread enters netns_fd only to open a netlink socket there, and returns to host_netns_fd.
 * Returns the host end's ifindex, or -1 with errno and *step naming what failed. Addresses in network order. */
int cubicle_link_create(const char *host_name, int netns_fd, int host_netns_fd, uint32_t gateway_be, uint32_t session_be,
                        const char **step);
/* Deletes a link by its host end's name (its peer goes with it). */
int cubicle_link_delete(const char *host_name);

/* One packet the egress rules refused, as NFLOG reported it. */
struct cubicle_denial {
    uint32_t source_be;
    uint32_t destination_be;
    uint16_t port;
    uint8_t protocol;
};
/* A netlink socket bound to NFLOG group `group`; -1 with errno (EBUSY: another socket has the group). */
int cubicle_nflog_open(uint16_t group);
/* Reads one batch from an NFLOG socket into out (at most max); the count, or -1 with errno. */
int cubicle_nflog_read(int fd, struct cubicle_denial *out, int max);

#endif
