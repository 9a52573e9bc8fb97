"""`quantkit archs`: what exllamav2 0.3.2 can quantize, and what quantkit refuses and why."""

from __future__ import annotations

import click
from rich.table import Table

from quantkit import EXLLAMAV2_VERSION, archs as table
from quantkit.archs import adapters
from quantkit.cli.output import Output


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def archs(as_json: bool) -> None:
    """List the architectures quantkit supports (exllamav2's own list), those it maps onto one of them
    through an adapter (experimental until proven on a GPU), and those it refuses.

    \b
    Examples:
      quantkit archs
      quantkit archs --json
    """
    out = Output()
    sup, ref, ada = table.supported(), table.refused(), adapters.entries()
    if as_json:
        out.json({"exllamav2": EXLLAMAV2_VERSION, "supported": [a.model_dump() for a in sup], "refused": [r.model_dump() for r in ref],
                  "adapters": [a.model_dump() | {"experimental": a.experimental} for a in ada]})
        return
    t = Table(title=f"Supported: exllamav2 {EXLLAMAV2_VERSION} recognises these config.json architectures")
    for col in ("architectures[0]", "family", "norm", "mlp", "attention", "notes"):
        t.add_column(col)
    for a in sup:
        notes = [n for n in (
            "MoE" if a.moe else "", "MQA" if a.mqa else "", "parallel decoder" if a.parallel_decoder else "",
            "alternating sliding window" if a.alternating_swa else "", f"rope {a.rope}" if a.rope != "neox" else "",
            "experimental in exllamav2" if a.experimental else "", f"needs {a.requires}" if a.requires else "", a.note or "",
        ) if n]
        t.add_row(a.name, a.family, a.norm, f"{a.mlp} {a.act}", f"{a.qkv} qkv", "; ".join(notes))
    out.rich(t)
    a = Table(title="Adapted: quantkit rewrites a working copy into an architecture exllamav2 has")
    for col in ("architectures[0]", "family", "becomes", "maths", "status"):
        a.add_column(col)
    for x in ada:
        status = "experimental: not yet proven in exllamav2 on a GPU" if x.experimental else "proven on a GPU"
        a.add_row(x.source, x.family, x.target, "exact" if x.exact else f"near-exact: {x.difference}", status)
    out.rich(a)
    r = Table(title="Refused before any work (exllamav2 would load them as Llama)")
    r.add_column("architectures[0]")
    r.add_column("family")
    r.add_column("reason")
    for x in ref:
        r.add_row(x.name, x.family, x.reason)
    out.rich(r)
