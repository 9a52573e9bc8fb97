"""A stand-in for `python -m quantkit.eval.worker` beside the converter double, whose outputs exllamav2
cannot load: it speaks the worker's protocol (jobs on stdin, JSON events, a result file per task) and
writes figures that follow the branch's bits, without torch. Tests of the evaluation itself run the real
worker through exllamav2 on the CPU (tests/test_eval.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quantkit.eval.records import TaskResult, write


def figures(folder: Path) -> dict[str, float]:
    qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    bits = float(qc.get("bits", 16.0))
    kl = 0.0 if bits >= 16 else 2.0 ** (4.0 - bits)
    return {"perplexity": 10.0 * (1 + kl), "kl_mean": kl, "kl_median": kl * 0.8, "kl_p99": kl * 4, "top1_agreement": 1 - kl / 2}


def main() -> int:
    for line in sys.stdin:
        job = json.loads(line)
        for task in job["tasks"]:
            f = figures(Path(task["folder"]))
            extra = {"perplexity": f["perplexity"]} if task["kind"] == "reference" else f
            print(json.dumps({"event": "plan", "task": task["name"], "kind": task["kind"], "mode": "full", "why": "double"}), flush=True)
            write(Path(task["out"]), TaskResult(name=task["name"], key=task["key"], status="done", mode="full",
                                                exllamav2_version="0.3.2+double", tokens=1, **extra))
            print(json.dumps({"event": "done", "task": task["name"], "status": "done"}), flush=True)
        print(json.dumps({"event": "idle"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
