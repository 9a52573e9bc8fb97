"""`--gpus` for `quantkit run` and `quantkit convert`: which GPUs, checked before anything starts."""

from __future__ import annotations

import click

from quantkit.branches import Branch
from quantkit.cli.output import Output
from quantkit.exl2 import converter as conv
from quantkit.parallel import SlotPlan, available_ram, choose_gpus, pinned, plan_slots, visible_gpus
from quantkit.pipeline import Pipeline
from quantkit.units import format_gib

gpus_option = click.option(
    "--gpus", metavar="IDS",
    help="Convert the branches side by side, one converter per GPU: comma-separated ids as `nvidia-smi -L` "
         "(or CUDA_VISIBLE_DEVICES, when set) lists them, or `all`. Default: all visible GPUs when there are several.")


def gpus_from(option: str | None) -> list[str]:
    """The GPUs to use ([] for one conversion after another). Raises NoSuchGpu before any work."""
    return choose_gpus(option, visible_gpus())


def measuring_converter(gpus: list[str]) -> conv.Converter | None:
    """The measurement runs on the first of the chosen GPUs, not on whatever cuda:0 is."""
    return pinned(gpus[0]) if gpus else None


def slots(out: Output, p: Pipeline, branches: list[Branch], gpus: list[str]) -> SlotPlan | None:
    """The slot plan for `gpus`, said on screen; None without GPUs."""
    if not gpus:
        return None
    plan = plan_slots(p, branches, gpus, ram_available=available_ram())
    line = f"converting up to {plan.at_once} branch(es) at once on GPU(s) {', '.join(gpus)}"
    if plan.limited_by_ram and plan.ram_available is not None:
        line += (f" (each conversion holds {format_gib(plan.ram_each)} of system RAM and "
                 f"{format_gib(plan.ram_available)} is available)")
    out.info(line)
    return plan
