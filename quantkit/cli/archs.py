"""`quantkit archs`: what exllamav2 0.3.2 can quantize, and what quantkit refuses and why."""

from __future__ import annotations

import click
from rich.table import Table

from quantkit import EXLLAMAV2_VERSION, archs as table
from quantkit.archs import adapters
from quantkit.cli.output import Output


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    cell = lambda v: v.replace("|", "\\|")  # noqa: E731 - a pipe inside a cell would split it
    return "\n".join([" | ".join(headers) + " |", "|".join(["---"] * len(headers)) + "|"]
                     + [" | ".join(cell(v) for v in r) + " |" for r in rows])


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, hidden=True, help="The same as --format json.")
def archs(fmt: str, as_json: bool) -> None:
    """List the architectures quantkit supports (exllamav2's own list), those it maps onto one of them
    through an adapter (experimental until proven on a GPU), and those it refuses.

    \b
    Examples:
      quantkit archs
      quantkit archs --format json
      quantkit archs --format markdown
      quantkit archs | grep Qwen2ForCausalLM
    """
    out = Output()
    sup, ref, ada = table.supported(), table.refused(), adapters.entries()
    if as_json or fmt == "json":
        out.json({"schema_version": 1, "exllamav2": EXLLAMAV2_VERSION, "supported": [a.model_dump() for a in sup],
                  "refused": [r.model_dump() for r in ref],
                  "adapters": [a.model_dump() | {"experimental": a.experimental} for a in ada]})
        return
    sections = []
    rows = []
    for a in sup:
        notes = [n for n in (
            "MoE" if a.moe else "", "MQA" if a.mqa else "", "parallel decoder" if a.parallel_decoder else "",
            "alternating sliding window" if a.alternating_swa else "", f"rope {a.rope}" if a.rope != "neox" else "",
            "experimental in exllamav2" if a.experimental else "", f"needs {a.requires}" if a.requires else "", a.note or "",
        ) if n]
        rows.append([a.name, a.family, a.norm, f"{a.mlp} {a.act}", f"{a.qkv} qkv", "; ".join(notes)])
    sections.append((f"Supported: exllamav2 {EXLLAMAV2_VERSION} recognises these config.json architectures",
                     ["architectures[0]", "family", "norm", "mlp", "attention", "notes"], rows))
    rows = []
    for x in ada:
        status = "experimental: not yet proven in exllamav2 on a GPU" if x.experimental else "proven on a GPU"
        rows.append([x.source, x.family, x.target, "exact" if x.exact else f"near-exact: {x.difference}", status])
    sections.append(("Adapted: quantkit rewrites a working copy into an architecture exllamav2 has",
                     ["architectures[0]", "family", "becomes", "maths", "status"], rows))
    sections.append(("Refused before any work (exllamav2 would load them as Llama)", ["architectures[0]", "family", "reason"],
                     [[x.name, x.family, x.reason] for x in ref]))
    if fmt == "markdown":
        out.text("\n\n".join(f"## {title}\n\n{_markdown(headers, rows)}" for title, headers, rows in sections))
        return
    for title, headers, rows in sections:
        t = Table(title=title)
        for col in headers:
            t.add_column(col)
        for r in rows:
            t.add_row(*r)
        out.rich(t)
