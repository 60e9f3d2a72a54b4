"""An OCI bundle that gives /bin/true the isolation a Cubicle sandbox has, for crun and runc to run.

Same namespaces (user with an unprivileged host range, pid, mount, net, ipc, uts, cgroup), the host's /usr
read-only with the merged-/usr symlinks, fresh /proc with runc's masks, a small /dev, tmpfs /tmp, no
capabilities, no_new_privs, Cubicle's seccomp allowlist and the same cgroup limits as SandboxSpec's defaults.
"""
import json
import os

# SandboxSpec's defaults (Sources/CubicleSandbox/SandboxSpec.swift).
MEMORY_BYTES = 1 << 30
CPU_QUOTA_US, CPU_PERIOD_US = 200_000, 100_000
PIDS = 512


def seccomp(repo):
    with open(os.path.join(repo, "sandbox/seccomp/default.json")) as f:
        profile = json.load(f)
    keep = ("names", "action", "args", "errnoRet")
    return {
        "defaultAction": profile["defaultAction"],
        "defaultErrnoRet": profile.get("defaultErrnoRet", 1),
        "architectures": profile.get("architectures", ["SCMP_ARCH_X86_64"]),
        "syscalls": [{k: v for k, v in s.items() if k in keep} for s in profile["syscalls"]],
    }


def make(bundle, repo, host_uid_base):
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(rootfs, exist_ok=True)
    for d in ("usr", "proc", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if not os.path.lexists(os.path.join(rootfs, name)):
            os.symlink(target, os.path.join(rootfs, name))
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 1000, "gid": 1000},
            "args": ["/bin/true"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "cubicle",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=64k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=256m"]},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nosuid", "nodev"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=256m"]},
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": host_uid_base, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": host_uid_base, "size": 65536}],
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")],
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": MEMORY_BYTES, "swap": MEMORY_BYTES},
                "cpu": {"quota": CPU_QUOTA_US, "period": CPU_PERIOD_US},
                "pids": {"limit": PIDS},
            },
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            "seccomp": seccomp(repo),
        },
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return bundle
