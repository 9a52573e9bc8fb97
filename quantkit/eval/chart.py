"""The quality chart: mean KL divergence against bits per weight, perplexity against size, one point per
branch. An SVG drawn from a jinja2 template (`templates/eval-chart.svg.j2`) rather than matplotlib: jinja2
is already a dependency, the file is a few kB of deterministic text (the same figures give the same
bytes, so a rerun does not make a new commit on main), and CI installs nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.files import write_text_atomic

if TYPE_CHECKING:
    from quantkit.eval.records import EvalReport

TEMPLATE = "eval-chart.svg.j2"
WIDTH, HEIGHT = 760, 320
PANEL_W, PANEL_H = 290, 210
PANELS_X = (70, 440)
PANEL_Y = 40


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _panel(x0: int, title: str, xlabel: str, ylabel: str, pts: list[tuple[float, float, str]], *,
           from_zero: bool, hline: tuple[float, str] | None = None) -> dict[str, Any]:
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + ([hline[0]] if hline else [])
    xlo, xhi = min(xs), max(xs)
    pad = (xhi - xlo) * 0.1 or 0.5
    xlo, xhi = xlo - pad, xhi + pad
    if from_zero:  # KL: 0 is the unquantized model, the scale that shows what a branch costs
        ylo, yhi = min(0.0, min(ys)), max(ys) * 1.15 or 1.0
    else:  # perplexity: differences of a few percent would vanish against 0
        span = (max(ys) - min(ys)) or abs(max(ys)) * 0.02 or 1.0
        ylo, yhi = min(ys) - 0.15 * span, max(ys) + 0.15 * span

    def sx(v: float) -> float:
        return round(x0 + (v - xlo) / (xhi - xlo) * PANEL_W, 1)

    def sy(v: float) -> float:
        return round(PANEL_Y + PANEL_H - (v - ylo) / (yhi - ylo) * PANEL_H, 1)

    points = [{"x": sx(x), "y": sy(y), "ly": round(sy(y) - 7, 1), "label": label, "value": _fmt(y)} for x, y, label in sorted(pts)]
    return {
        "x0": x0, "y0": PANEL_Y, "w": PANEL_W, "h": PANEL_H, "title": title, "xlabel": xlabel, "ylabel": ylabel,
        "xticks": [{"pos": sx(v), "label": _fmt(v)} for v in _ticks(xlo, xhi)],
        "yticks": [{"pos": sy(v), "label": _fmt(v)} for v in _ticks(ylo, yhi)],
        "points": points, "path": " ".join(f"{p['x']},{p['y']}" for p in points),
        "hline": {"y": sy(hline[0]), "label": hline[1]} if hline else None,
    }


def render_chart(report: EvalReport) -> str | None:
    """The SVG text, or None when no branch has figures."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    done = [b for b in report.branches.values() if b.status == "done" and b.kl_mean is not None]
    if not done:
        return None
    bits = [(b.achieved_bpw or b.bits or 0.0, b.kl_mean or 0.0, b.branch) for b in done]
    unit, scale = ("GiB", 1024**3) if max(b.bytes or 0 for b in done) >= 1024**3 else ("MiB", 1024**2)
    size = [((b.bytes or 0) / scale, b.perplexity or 0.0, b.branch) for b in done]
    ref_ppl = report.reference.perplexity
    panels = [
        _panel(PANELS_X[0], "KL divergence vs the unquantized model", "bits per weight (decoder)", "mean KL (nats/token)",
               bits, from_zero=True),
        _panel(PANELS_X[1], "Perplexity", f"size of the weights ({unit})", "perplexity", size, from_zero=False,
               hline=(float(ref_ppl), f"unquantized {_fmt(float(ref_ppl))}") if ref_ppl else None),
    ]
    env = Environment(loader=PackageLoader("quantkit", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    caption = (f"{report.text.tokens} tokens of {report.text.name} (sha256 {report.text.sha256[:12]}), "
               f"exllamav2 {report.exllamav2_version}; sizes {', '.join(f'{b.branch} {(b.bytes or 0) / scale:.3g} {unit}' for b in done)}")
    return env.get_template(TEMPLATE).render(width=WIDTH, height=HEIGHT, panels=panels, caption=caption)


def write_chart(report: EvalReport, path: Path) -> Path | None:
    """Write the chart when there is something to draw (rewritten only when it changed)."""
    svg = render_chart(report)
    if svg is None:
        path.unlink(missing_ok=True)
        return None
    if not path.is_file() or path.read_text(encoding="utf-8") != svg:
        write_text_atomic(path, svg)
    return path
