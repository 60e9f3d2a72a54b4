"""Cold-start latency distributions from the samples `make bench` wrote, as a PNG (Debian's gnuplot).

    python3 Tests/bench/plot_cold_start.py SAMPLES_DIR OUT.png
"""
import os
import shutil
import subprocess
import sys
import tempfile

SAMPLES, OUT = sys.argv[1], sys.argv[2]
SERIES = [
    ("cubicle-spawn", "Cubicle sandbox spawn-to-ready"),
    ("cubicle-lifecycle", "Cubicle sandbox spawn + teardown"),
    ("bwrap", "bwrap /bin/true"),
    ("unshare", "unshare ... true"),
    ("crun", "crun run /bin/true"),
    ("runc", "runc run /bin/true"),
    ("cold-invoke", "Cubicle cold invoke, demo agent (new session -> response)"),
]


def main():
    if not shutil.which("gnuplot"):
        print("gnuplot is not installed; no plot drawn", file=sys.stderr)
        return
    work = tempfile.mkdtemp(prefix="cubicle-plot-")
    plots = []
    for name, title in SERIES:
        path = os.path.join(SAMPLES, name + ".txt")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            xs = sorted(int(line) / 1e6 for line in f if line.strip())
        if not xs:
            continue
        data = os.path.join(work, name + ".dat")
        with open(data, "w") as f:
            for i, x in enumerate(xs):
                f.write(f"{x} {(i + 1) / len(xs)}\n")
        plots.append(f"'{data}' using 1:2 with steps lw 2 title '{title} (n={len(xs)})'")
    script = "\n".join([
        "set terminal pngcairo size 1100,760 noenhanced font 'sans,10'",
        f"set output '{OUT}'",
        "set title 'Cold start: cumulative distribution of latency (same machine, same run)'",
        "set xlabel 'milliseconds (log scale)'",
        "set ylabel 'fraction of runs at or below'",
        "set logscale x",
        "set grid",
        "set key outside below",
        "set yrange [0:1]",
        "plot " + ", ".join(plots),
    ])
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    shutil.rmtree(work, ignore_errors=True)


main()
