"""Wall time of `quantkit run` for three branches: one after another, `--gpus 0,1,2`, and a local Ray
cluster with three declared GPUs (`--cluster auto`), on this CPU machine with the converter double
(tests/double/convert_exl2.py) taking JOB_SECONDS per job (the measurement and each conversion).

What it prints, per mode: the wall time, the ideal time (serial: measure + 3 conversions; parallel:
measure + 1 conversion), the time at least one converter process ran (from the double's own start/end
lines in each job's log), and quantkit's overhead: wall time in which no converter ran, as a share
of the run. Ray's own start (`ray.init`) is printed apart: a cluster is started once, not per run.

    python scripts/bench_parallel.py [--job-seconds 10] [--out benchmarks/cpu/parallel_branches.txt]

Serial and --gpus run `quantkit` as a subprocess (CUDA_VISIBLE_DEVICES="0" and "0,1,2": the GPUs
quantkit discovers); Ray runs the same command in this process, after `ray.init(num_gpus=3)`, so the
cluster it joins is the one this script started and stops (never `ray stop`, which ends every Ray).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "double" / "convert_exl2.py"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

_START = re.compile(r"\(double\) start ([\d.]+)")
_END = re.compile(r"\(double\) end ([\d.]+)")


def recipe(folder: Path, model: Path) -> Path:
    text = "\n".join([f'model = "{model}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
                      *(f'[[branches]]\nname = "{b}"\nbits = {b}' for b in ("8.0", "6.5", "5.0")),
                      "[publish]", 'to = "repo"'])
    folder.mkdir(parents=True)
    (path := folder / "r.toml").write_text(text + "\n")
    return path


def busy_seconds(root: Path) -> float:
    """Seconds during which at least one converter process ran, from every job log under `root`."""
    spans: list[tuple[float, float]] = []
    for log in root.rglob("quantkit-converter.log"):
        start = None
        for line in log.read_text().splitlines():
            if m := _START.search(line):
                start = float(m.group(1))
            elif (m := _END.search(line)) and start is not None:
                spans.append((start, float(m.group(1))))
                start = None
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run_cli(args: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "quantkit", *args], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t
    if proc.returncode != 0:
        sys.exit(f"quantkit {shlex.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-seconds", type=float, default=10.0, help="seconds the double takes per job")
    ap.add_argument("--out", type=Path, help="also write the figures to this file, the command first")
    a = ap.parse_args()

    from tiny import make_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="quantkit-bench-parallel-"))
    model = make_tiny_llama(tmp / "tiny-llama")
    env = os.environ | {"QUANTKIT_CONVERTER": f"{sys.executable} {DOUBLE}", "QUANTKIT_CONVERTER_VERSION": "0.3.2+double",
                        "QK_DOUBLE_JOB_SECONDS": str(a.job_seconds), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                        "HF_HOME": str(tmp / "hf"), "QUANTKIT_HOME": str(tmp / "home")}
    rows: list[tuple[str, float, float, float]] = []

    serial = recipe(tmp / "serial", model)
    wall = run_cli(["run", str(serial)], env | {"CUDA_VISIBLE_DEVICES": "0"})
    rows.append(("serial (1 GPU)", wall, 4 * a.job_seconds, busy_seconds(tmp / "serial" / "w")))

    gpus = recipe(tmp / "gpus", model)
    wall = run_cli(["run", str(gpus), "--gpus", "0,1,2"], env | {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    rows.append(("--gpus 0,1,2", wall, 2 * a.job_seconds, busy_seconds(tmp / "gpus" / "w")))

    import ray

    from quantkit.cli.main import cli

    os.environ.update(env)
    t = time.monotonic()
    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {k: env[k] for k in ("QUANTKIT_CONVERTER", "QUANTKIT_CONVERTER_VERSION",
                                                            "QK_DOUBLE_JOB_SECONDS", "PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME")}})
    ray_start = time.monotonic() - t
    try:
        cluster = recipe(tmp / "ray", model)
        t = time.monotonic()
        cli.main(["run", str(cluster), "--cluster", "auto", "--node-work", str(tmp / "ray" / "nodes")],
                 prog_name="quantkit", standalone_mode=False)
        wall = time.monotonic() - t
    finally:
        ray.shutdown()
    rows.append(("--cluster (Ray, 3 GPUs)", wall, 2 * a.job_seconds, busy_seconds(tmp / "ray")))

    lines = [f"$ python scripts/bench_parallel.py --job-seconds {a.job_seconds:g}",
             f"three branches (8.0, 6.5, 5.0 bpw) of a tiny Llama; the converter double takes {a.job_seconds:g} s per job;"
             f" {os.cpu_count()} CPU cores; ray.init (3 declared GPUs) took {ray_start:.1f} s, not counted below",
             f"{'mode':<26}{'wall s':>9}{'ideal s':>9}{'converters s':>14}{'overhead s':>12}{'overhead %':>12}{'vs serial':>11}"]
    for name, wall, ideal, busy in rows:
        own = wall - busy
        lines.append(f"{name:<26}{wall:>9.2f}{ideal:>9.2f}{busy:>14.2f}{own:>12.2f}{100 * own / wall:>11.1f}%{rows[0][1] / wall:>10.2f}x")
    lines.append("converters s: time in which at least one converter process ran (the double's own start/end lines);"
                 " overhead: the rest of the wall time (quantkit, Python start-up, Ray's scheduling and worker start, publishing)")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
