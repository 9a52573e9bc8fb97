"""The pure half of the GPU proof: everything measure_vram.py does that needs no GPU.

Finding the converted branches of a quantkit work folder, the `quantkit vram` call and the parsing of
its JSON, the achieved bits per weight from safetensors headers, the measured-vs-estimated rows of
benchmarks/gpu/vram.json, and the results.json / summary.md writers. No torch, no exllamav2: the CPU
test suite (tests/test_gpu_report.py) runs all of it on fabricated test inputs.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3

#: The goal for every cell: within +-0.25 GiB of the measurement, never under it by more than 0.1 GiB.
BAND_BYTES = int(0.25 * GiB)
UNDER_BYTES = int(0.1 * GiB)

#: How far achieved decoder bpw may sit from the target before the report flags it. exllamav2's
#: optimizer fits `numel * bits` from below with discrete per-layer options; at 8.0 the dearest option
#: is ~8.04 bpw, so a few hundredths either side is normal.
BPW_TOLERANCE = 0.15

#: prove.sh's name for the stage that JIT-compiles exllamav2_ext (its seconds are the build time).
BUILD_STAGE = "build_extension"

#: The keys of one vram.json row, in order.
VRAM_KEYS = ("model", "bits", "head_bits", "cache", "context", "measured_bytes", "estimated_bytes", "how_measured")


@dataclass(frozen=True)
class BranchDir:
    """One converted branch: WORK/out/<branch>/ with exllamav2's quantization_config in config.json."""

    model: str
    branch: str
    path: Path
    bits: float
    head_bits: int


@dataclass(frozen=True)
class Measurement:
    """What measure_vram.py reads off the GPU for one cell. Bytes throughout."""

    model: str
    branch: str
    bits: float
    head_bits: int
    cache: str
    context: int
    load_peak_allocated: int  # torch.cuda.max_memory_allocated() over the load (after a reset)
    gen_peak_allocated: int  # the same over one generator job (reset after loading)
    peak_reserved: int  # torch.cuda.max_memory_reserved() over the whole cell
    cuda_context: int  # (mem_get_info total - free) - torch.cuda.memory_reserved(), read after the job
    allocated_before: int  # torch.cuda.memory_allocated() when the cell started (left by earlier cells)
    device_used_after: int  # mem_get_info total - free after the job, everything included
    loader: str  # "tabby" | "autosplit" (quantkit vram --loader)
    attention: str  # e.g. "flash-attn 2.7.4 paged" | "torch sdpa (unpaged)"
    prompt_tokens: int
    new_tokens: int

    @property
    def peak_allocated(self) -> int:
        return max(self.load_peak_allocated, self.gen_peak_allocated)

    @property
    def measured_bytes(self) -> int:
        """The peak as exllamav2 allocates it: torch's peak allocated plus the CUDA context."""
        return self.peak_allocated + self.cuda_context


def how_measured(m: Measurement) -> str:
    load = ("ExLlamaV2.load_autosplit(cache)" if m.loader == "autosplit" else
            "ExLlamaV2.load(), the cache, then a prefill-only test forward of max_input_len tokens (TabbyAPI's way)")
    return (
        f"max(torch.cuda.max_memory_allocated() over {load}, the same over one ExLlamaV2DynamicGenerator job of "
        f"{m.prompt_tokens} prompt + {m.new_tokens} new tokens), each after torch.cuda.reset_peak_memory_stats(); "
        f"plus the CUDA context = (torch.cuda.mem_get_info() total - free) - torch.cuda.memory_reserved() read "
        f"after the job; attention: {m.attention}; one process for all cells, {m.allocated_before} bytes "
        f"still allocated at the cell's start"
    )


# ---- branches ---------------------------------------------------------------------------------------


def discover_branches(model: str, work: Path) -> list[BranchDir]:
    """Every WORK/out/<branch>/ holding an EXL2 config.json, in descending bits."""
    found = []
    for cfg_path in sorted((work / "out").glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        qc = cfg.get("quantization_config") or {}
        if qc.get("quant_method") != "exl2":
            continue
        found.append(BranchDir(model=model, branch=cfg_path.parent.name, path=cfg_path.parent,
                               bits=float(qc["bits"]), head_bits=int(qc["head_bits"])))
    return sorted(found, key=lambda b: -b.bits)


# ---- the estimate: `quantkit vram` ------------------------------------------------------------------


def quantkit_vram_argv(folder: Path, *, bits: float, head_bits: int, contexts: list[int], caches: list[str],
                       loader: str = "tabby", flash_attn: bool = True) -> list[str]:
    """The one `quantkit vram` call the proof compares against (a converted folder at its own bits: sized
    from its headers), assuming the loader and attention backend the measurement uses."""
    return [
        sys.executable, "-m", "quantkit", "vram", str(folder),
        "--bits", f"{bits:g}", "--head-bits", str(head_bits),
        "--context", ",".join(str(c) for c in contexts),
        "--cache", ",".join(caches),
        "--loader", loader, *([] if flash_attn else ["--no-flash-attn"]),
        "--format", "json",
    ]


def estimates_from_vram_json(text: str) -> dict[tuple[str, int], int]:
    """{(cache, context): total_bytes} from `quantkit vram --format json` for one branch."""
    rows = json.loads(text)["rows"]
    return {(r["cache"], int(r["context"])): int(r["total_bytes"]) for r in rows}


def run_quantkit_vram(folder: Path, *, bits: float, head_bits: int, contexts: list[int], caches: list[str],
                      loader: str = "tabby", flash_attn: bool = True,
                      env: dict[str, str] | None = None) -> dict[tuple[str, int], int]:
    argv = quantkit_vram_argv(folder, bits=bits, head_bits=head_bits, contexts=contexts, caches=caches,
                              loader=loader, flash_attn=flash_attn)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed ({done.returncode}): {done.stderr.strip()}")
    return estimates_from_vram_json(done.stdout)


# ---- achieved bits per weight -----------------------------------------------------------------------


def achieved_bpw(exl2: dict[str, int], source: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Achieved bits per weight of the decoder linears and of lm_head.

    Args:
        exl2: tensor name -> bytes, from the converted folder's safetensors headers.
        source: tensor name -> shape, from the source model's headers.

    Each source linear `X.weight` became `X.q_weight`, `X.q_scale`, `X.q_scale_max`, `X.q_groups`,
    `X.q_invperm` (and `X.bias`): the bits of all of them over the source weight's element count is
    what exllamav2's QParams.total_bits and optimizer count.
    """
    def group(prefix_ok) -> tuple[int, int]:
        bits = numel = 0
        for name, shape in source.items():
            if not name.endswith(".weight") or len(shape) != 2 or not prefix_ok(name):
                continue
            key = name[: -len(".weight")]
            parts = [n for n in exl2 if n.startswith(key + ".q_")]
            if not parts:
                raise ValueError(f"{key} has no EXL2 tensors in the converted folder")
            bits += 8 * sum(exl2[n] for n in parts)
            numel += math.prod(shape)
        return bits, numel

    dec_bits, dec_numel = group(lambda n: ".layers." in n)
    head_bits, head_numel = group(lambda n: n.startswith("lm_head."))
    return {"decoder_bpw": dec_bits / dec_numel, "head_bpw": head_bits / head_numel if head_numel else math.nan,
            "decoder_params": dec_numel}


def bpw_ok(target: float, achieved: float, tolerance: float = BPW_TOLERANCE) -> bool:
    return abs(achieved - target) <= tolerance


# ---- rows and verdicts ------------------------------------------------------------------------------


def vram_row(m: Measurement, estimated: int) -> dict[str, Any]:
    row = {
        "model": m.model, "bits": m.bits, "head_bits": m.head_bits, "cache": m.cache, "context": m.context,
        "measured_bytes": m.measured_bytes, "estimated_bytes": estimated, "how_measured": how_measured(m),
    }
    assert tuple(row) == VRAM_KEYS
    return row


def verdict(measured: int, estimated: int) -> dict[str, Any]:
    """The goal for one cell: |estimate - measured| <= 0.25 GiB and estimate >= measured - 0.1 GiB."""
    diff = estimated - measured
    return {"diff_bytes": diff, "diff_gib": round(diff / GiB, 4),
            "within_band": abs(diff) <= BAND_BYTES, "under_ok": diff >= -UNDER_BYTES,
            "meets_goal": abs(diff) <= BAND_BYTES and diff >= -UNDER_BYTES}


def cell_record(m: Measurement, estimated: int) -> dict[str, Any]:
    """The detailed results.json entry for one cell: every raw reading plus the verdict."""
    return {**asdict(m), "measured_bytes": m.measured_bytes, "estimated_bytes": estimated, **verdict(m.measured_bytes, estimated)}


@dataclass
class Report:
    """Everything one run of the proof found; `write` turns it into the three files."""

    command: str
    date: str
    device: dict[str, Any]
    versions: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    branches: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, m: Measurement, estimated: int) -> None:
        self.rows.append(vram_row(m, estimated))
        self.cells.append(cell_record(m, estimated))

    def results(self) -> dict[str, Any]:
        return {
            "command": self.command, "date": self.date, "device": self.device, "versions": self.versions,
            "build_seconds": next((s["seconds"] for s in self.stages if s["stage"] == BUILD_STAGE), None),
            "stages": self.stages, "branches": self.branches, "generations": self.generations,
            "goal": {"band_bytes": BAND_BYTES, "max_under_bytes": UNDER_BYTES},
            "cells_meeting_goal": sum(c["meets_goal"] for c in self.cells), "cells": self.cells,
            "skipped": self.skipped, "errors": self.errors,
        }

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "vram.json", out / "results.json", out / "summary.md"]
        paths[0].write_text(json.dumps(self.rows, indent=2) + "\n", encoding="utf-8")
        paths[1].write_text(json.dumps(self.results(), indent=2, default=str) + "\n", encoding="utf-8")
        paths[2].write_text(summary_markdown(self), encoding="utf-8")
        return paths


def _gib(n: int) -> str:
    return f"{n / GiB:.3f}"


def summary_markdown(r: Report) -> str:
    lines = [
        "# GPU proof: exllamav2 conversion and measured VRAM",
        "",
        f"- Date: {r.date}",
        f"- Command: `{r.command}`",
        f"- Device: {', '.join(f'{k} {v}' for k, v in r.device.items())}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in r.versions.items())}",
        "",
    ]
    if r.stages:
        lines += ["## Stages", "", "| stage | seconds | status |", "|---|---:|---|"]
        lines += [f"| {s['stage']} | {s['seconds']} | {s['status']} |" for s in r.stages]
        lines.append("")
    if r.branches:
        lines += ["## Branches", "", "| model | branch | target bits | achieved decoder bpw | head bits | achieved head bpw | within tolerance |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for b in r.branches:
            lines.append(f"| {b['model']} | {b['branch']} | {b['bits']:g} | {b['decoder_bpw']:.3f} | {b['head_bits']} | "
                         f"{b['head_bpw']:.3f} | {'yes' if b['bpw_ok'] else 'NO'} |")
        lines.append("")
    if r.cells:
        met = sum(c["meets_goal"] for c in r.cells)
        lines += ["## VRAM: measured vs `quantkit vram` (GiB)", "",
                  f"{met} of {len(r.cells)} cells meet the goal (within +-0.25 GiB, never under by more than 0.1 GiB). "
                  f"How measured: {r.rows[0]['how_measured'] if r.rows else ''}", "",
                  "| model | bits | cache | context | measured | estimated | estimate - measured | goal |",
                  "|---|---:|---|---:|---:|---:|---:|---|"]
        for c in r.cells:
            lines.append(f"| {c['model']} | {c['bits']:g} | {c['cache']} | {c['context']} | {_gib(c['measured_bytes'])} | "
                         f"{_gib(c['estimated_bytes'])} | {c['diff_gib']:+.3f} | {'met' if c['meets_goal'] else 'MISSED'} |")
        lines.append("")
    if r.generations:
        lines += ["## Generation samples (random weights: gibberish is expected)", ""]
        lines += [f"- {g['model']} {g['branch']}: {json.dumps(g['text'])}" for g in r.generations]
        lines.append("")
    if r.skipped:
        lines += [f"Skipped {len(r.skipped)} cells (time limit): " + ", ".join(
            f"{s['model']} {s['branch']} {s['cache']} {s['context']}" for s in r.skipped), ""]
    if r.errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in r.errors] + [""]
    return "\n".join(lines)


def read_stages(path: Path) -> list[dict[str, Any]]:
    """prove.sh's stages.tsv: `stage<TAB>seconds<TAB>status` per line."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        stage, seconds, status = (line.split("\t") + ["", ""])[:3]
        out.append({"stage": stage, "seconds": float(seconds) if re.fullmatch(r"[\d.]+", seconds) else seconds, "status": status})
    return out
