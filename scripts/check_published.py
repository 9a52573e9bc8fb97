#!/usr/bin/env python3
"""Compare quantkit's slopes with the three published EXL2 VRAM tables.

The tables (benchmarks/published_vram_tables.json, copied from ../shared/reference/vram-published)
were made with exllamav2 0.0.13-0.1.7, which reserved more scratch than 0.3.2, so absolute values
differ; their slopes are physics. For every row this prints:
  - the context slope: VRAM(largest ctx) - VRAM(smallest ctx), published vs estimated;
  - the bitrate slope: VRAM(this row) - VRAM(next row) at the smallest context, published vs estimated;
and the median absolute residual of each (target: within 5 %). Rows beyond 7 % get a likely cause.

Usage: python scripts/check_published.py [--json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from quantkit import archs
from quantkit.model import Model, read_shape
from quantkit.vram import GiB, CacheMode, estimate

TABLES = Path(__file__).resolve().parent.parent / "benchmarks" / "published_vram_tables.json"
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM"}
ROUNDING = 0.1  # the tables print one decimal: a difference of two cells carries up to +-0.1 GiB


def model_for(table: dict) -> Model:
    c = table["config"]
    config = {k: v for k, v in c.items() if k not in ("arch", "config_source")}
    config["architectures"] = [ARCH[c["arch"]]]
    spec = archs.resolve(config)
    return Model(ref=table["id"], source="folder", path=None, config=config, spec=spec, shape=read_shape(config, spec), tensors={})


def gib(model: Model, row: dict, ctx: int) -> float:
    e = estimate(model, bits=row["bits"], head_bits=int(row["head_bits"]), context=ctx, cache=CacheMode(row["cache_mode"].lower()))
    return e.total / GiB


def cause(kind: str, pub: float, est: float, table: dict, row: dict, nxt: dict | None) -> str:
    if abs(pub - est) <= ROUNDING + 0.02:
        return "within the +-0.1 rounding of two printed cells"
    if kind == "context" and table["config"].get("sliding_window"):
        return "older exllamav2 sized attention scratch with the context (no flash-attn, max_attention_size chunks)"
    if kind == "bitrate" and nxt is not None and row["head_bits"] != nxt["head_bits"]:
        return "the head bits change between these rows; the card may not have re-measured after the change"
    if "copy" in table.get("provenance", "") or "same numbers" in table.get("provenance", ""):
        return "the table was copied between models of a size class, not measured for this one"
    return "not explained by the model: a noisy row of a hand-made table"


def main() -> int:
    tables = json.loads(TABLES.read_text())
    rows_out = []
    ctx_res, bit_res = [], []
    for t in tables:
        model = model_for(t)
        rows = t["rows"]
        for i, row in enumerate(rows):
            ctxs = sorted(int(c) for c in row["ctx"])
            lo, hi = ctxs[0], ctxs[-1]
            pub = row["ctx"][str(hi)] - row["ctx"][str(lo)]
            est = gib(model, row, hi) - gib(model, row, lo)
            res = est / pub - 1
            ctx_res.append(abs(res))
            rows_out.append(("context", t["id"], row["branch"], f"{lo}->{hi}", pub, est, res, cause("context", pub, est, t, row, None)))
            if i + 1 < len(rows):
                nxt = rows[i + 1]
                pub_b = row["ctx"][str(lo)] - nxt["ctx"][str(lo)]
                est_b = gib(model, row, lo) - gib(model, nxt, lo)
                res_b = est_b / pub_b - 1
                bit_res.append(abs(res_b))
                rows_out.append(("bitrate", t["id"], f"{row['branch']}->{nxt['branch']}", f"@{lo}", pub_b, est_b, res_b,
                                 cause("bitrate", pub_b, est_b, t, row, nxt)))
    if "--json" in sys.argv:
        print(json.dumps([dict(zip(("slope", "table", "rows", "at", "published_gib", "estimated_gib", "residual", "cause"), r)) for r in rows_out], indent=2))
    else:
        print(f"{'slope':8} {'table':18} {'rows':11} {'at':13} {'published':>9} {'estimated':>9} {'residual':>8}")
        for kind, tid, br, at, pub, est, res, why in rows_out:
            flag = f"  <- {why}" if abs(res) > 0.07 else ""
            print(f"{kind:8} {tid:18} {br:11} {at:13} {pub:9.2f} {est:9.2f} {res:+8.1%}{flag}")
    med_c, med_b = statistics.median(ctx_res), statistics.median(bit_res)
    print(f"median |residual|: context slope {med_c:.1%}, bitrate slope {med_b:.1%} (target: within 5 %)", file=sys.stderr)
    return 0 if med_c <= 0.05 and med_b <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
