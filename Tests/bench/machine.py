"""The head of docs/benchmarks.md: the machine every figure below was measured on, and how to rerun them."""
import os
import platform
import subprocess


def first(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def mem_gib():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / (1 << 20)


def cgroup_mode():
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2 (unified)"
    return "v1 (hybrid, v2 mounted at /sys/fs/cgroup/unified)" if os.path.ismount("/sys/fs/cgroup/unified") else "v1"


print("# Benchmarks\n")
print("Every figure is measured beside its peer on the same machine in the same run; `make bench` reruns them all "
      "(release build) and rewrites this file and `docs/benchmarks-cold-start.png`. The steps it runs, in order:\n")
print("```")
print("swift build -c release")
print(".build/release/cubicle-sandbox-bench bench $PWD $PWD/.build/release 200 .build/bench-samples")
print("python3 Tests/bench/sandbox_peers.py .build/release .build/bench-samples 200")
print("CUBICLE_BENCH_SAMPLES=.build/bench-samples python3 Tests/bench/dataplane_bench.py .build/release")
print("python3 Tests/bench/warm_pool_bench.py .build/release")
print("python3 Tests/bench/scale_bench.py .build/release 1000 30")
print("python3 Tests/bench/noisy_bench.py .build/release")
print("python3 Tests/bench/egress_bench.py .build/release")
print("python3 Tests/bench/image_bench.py .build/release 100")
print("python3 Tests/bench/plot_cold_start.py .build/bench-samples docs/benchmarks-cold-start.png")
print("```\n")
print("Peers and tools need Debian's `bubblewrap crun runc haproxy wrk gnuplot-nox` (`make bench-deps` installs them).\n")
print("| machine | |")
print("|---|---|")
print(f"| CPU | {os.cpu_count()} cores, {cpu_model()} |")
print(f"| memory | {mem_gib():.1f} GiB |")
print(f"| kernel | {platform.release()} |")
print(f"| cgroup | {cgroup_mode()} |")
print(f"| peers | {first(['bwrap', '--version'])}; {first(['crun', '--version'])}; {first(['runc', '--version'])}; "
      f"{first(['haproxy', '-v'])}; {first(['wrk', '-v'])} |")
print()
print("![Cold start: cumulative distributions](benchmarks-cold-start.png)\n")
