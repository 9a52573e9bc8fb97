"""What the card shows of the evaluation: KL and PPL columns in "Available sizes", a sentence, the chart."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.eval import CHART_NAME
from quantkit.eval.core import read_report


class CardQuality(BaseModel):
    model_config = ConfigDict(frozen=True)

    columns: dict[str, dict[str, str]]  # heading -> branch -> cell
    note: str
    chart: str | None  # the chart's URL on main, when there is one


def _kl(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def _ppl(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}" if v < 1e4 else f"{v:.0f}"


def card_quality(work: Path, repo: str) -> CardQuality | None:
    """None when the work folder has no evaluation."""
    report = read_report(work)
    if report is None:
        return None
    done = {n: b for n, b in report.branches.items() if b.status == "done"}
    if not done:
        return None
    t = report.text
    ref = report.reference.perplexity
    note = (f"KL: mean KL divergence (nats per token) of each branch's next-token distribution from the unquantized "
            f"model's; PPL: perplexity. Both over {t.tokens:,} tokens ({t.rows} rows of {t.length}) of "
            f"{t.name} (sha256 `{t.sha256[:12]}`), which is not the calibration set, with exllamav2 "
            f"{report.exllamav2_version}" + (f"; the unquantized model's PPL is {_ppl(ref)}" if ref else "") + ". "
            "Top-1 agreement, median and p99 KL are in `eval.json` on the main branch.")
    chart = f"https://huggingface.co/{repo}/resolve/main/{CHART_NAME}" if (work / CHART_NAME).is_file() else None
    return CardQuality(columns={"KL": {n: _kl(b.kl_mean) for n, b in done.items()},
                                "PPL": {n: _ppl(b.perplexity) for n, b in done.items()}}, note=note, chart=chart)
