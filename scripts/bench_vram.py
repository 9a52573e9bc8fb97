#!/usr/bin/env python3
"""Time `quantkit vram` on local folders and show it reads no tensor data.

Target: under 1 s wall on a 2-core machine for a local folder, reading no tensor data.
Prints, for a config-only folder and for a folder holding a ~15 GiB (sparse) shard of the Llama-3-8B
shape: the median wall time of the whole CLI as a fresh process (interpreter start included), the
median in-process time of load + plan, and the bytes the process read (/proc/self/io rchar).

Usage: python scripts/bench_vram.py [--runs N]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "llama3-8b"


def sparse_shard(folder: Path) -> int:
    """A safetensors file whose header describes the real Llama-3-8B tensors; the data is a sparse hole."""
    cfg = json.loads((folder / "config.json").read_text())
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.v_proj.weight": [kv, h],
                   p + "self_attn.o_proj.weight": [h, h], p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                   p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    header, off = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return path.stat().st_size


def cli_wall(folder: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantkit", "vram", str(folder), "--format", "json"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(folder: Path, runs: int) -> tuple[float, int]:
    from quantkit.branches import default_branches
    from quantkit.model import load_model
    from quantkit.plan import make_plan
    from quantkit.vram import CacheMode

    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        return -1

    times, read = [], 0
    for _ in range(runs):
        before = rchar()
        t = time.perf_counter()
        m = load_model(folder)
        make_plan(m, default_branches(), [4096, 8192, 16384, 32768], list(CacheMode))
        times.append(time.perf_counter() - t)
        read = rchar() - before
    return statistics.median(times), read


def main() -> int:
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 5
    with tempfile.TemporaryDirectory() as tmp:
        cfg_only = Path(tmp) / "config-only"
        shutil.copytree(EXAMPLE, cfg_only)
        with_shard = Path(tmp) / "with-shard"
        shutil.copytree(EXAMPLE, with_shard)
        size = sparse_shard(with_shard)
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, {runs} runs each (median)")
        for label, folder in (("config.json only", cfg_only), (f"+ {size / 1024**3:.1f} GiB shard (sparse)", with_shard)):
            wall = cli_wall(folder, runs)
            proc, read = in_process(folder, runs)
            print(f"{label:32} CLI wall {wall:.3f} s | load+plan (3 branches x 5 caches x 4 contexts) {proc * 1000:.1f} ms | read {read / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
