"""What an adapter is: a check of the source config (refusing before any work) and a tensor plan.

An adapter never touches the user's folder: `adapters.prepare()` (in `workcopy.py`) writes a working copy whose
config.json declares a supported exllamav2 architecture. The types here are the API the measure/convert
pipeline calls; the registry that picks an adapter by `architectures[0]` is `quantkit.archs.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from quantkit.errors import AdapterCheckpointMismatch, AdapterRefused, MissingConfigKey
from quantkit.hfconfig import MISSING, lookup

Status = Literal["experimental", "proven"]

#: Key under which the working copy's config.json records where it came from (exllamav2 ignores it).
CONFIG_KEY = "quantkit_adapter"
#: The working copy's own provenance file, beside config.json.
PROVENANCE_FILE = "quantkit-adapter.json"


class AdapterEntry(BaseModel):
    """One row of `adapters.toml`."""

    model_config = ConfigDict(frozen=True)

    source: str
    adapter: str
    target: str
    family: str
    status: Status
    exact: bool
    maths: str
    proof: str
    difference: str = ""

    @property
    def experimental(self) -> bool:
        return self.status != "proven"


class AdapterPlan(BaseModel):
    """What `check(config)` found: the config.json exllamav2 will read, and what differs from the source.

    `config` is complete: the planner sizes the model from it with the target's table entry.
    """

    model_config = ConfigDict(frozen=True)

    adapter: str
    source_arch: str
    target_arch: str
    status: Status
    exact: bool
    config: dict[str, Any]
    tensor_ops: list[str]
    differences: list[str]

    @property
    def experimental(self) -> bool:
        """True until the adapter is proven on a GPU; the card and `quantkit vram` say so."""
        return self.status != "proven"

    def summary(self) -> str:
        state = "experimental: not yet proven in exllamav2 on a GPU" if self.experimental else "proven on a GPU"
        return f"{self.source_arch} -> {self.target_arch} through quantkit's {self.adapter} adapter ({state})"


class AdaptedModel(BaseModel):
    """The working copy `prepare()` wrote: point exllamav2's converter at `path`."""

    model_config = ConfigDict(frozen=True)

    path: Path
    source: Path
    plan: AdapterPlan
    files: dict[str, Literal["linked", "copied", "written"]]
    tensors: int
    written_bytes: int


@dataclass(frozen=True)
class TensorInfo:
    """A source tensor as its header describes it, and the file that holds it."""

    dtype: str  # safetensors spelling: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class Out:
    """One tensor of the working copy: a source tensor (whole, or some of its rows) or zeros."""

    name: str
    source: str | None = None
    rows: tuple[int, ...] | None = None  # row indices of a 2-D weight or 1-D bias; None = all
    zeros: tuple[tuple[int, ...], str] | None = None  # (shape, dtype) when there is no source

    @property
    def identity(self) -> bool:
        return self.source == self.name and self.rows is None


class Adapter:
    """Base of an adapter module's `ADAPTER`. Subclasses implement `check` and `tensor_plan`."""

    name: str = ""
    sources: tuple[str, ...] = ()

    def check(self, config: dict[str, Any]) -> AdapterPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensor_plan(self, plan: AdapterPlan, tensors: dict[str, TensorInfo]) -> list[Out]:  # pragma: no cover
        raise NotImplementedError


# ---- reading a source config ------------------------------------------------------------------------


def need_int(config: dict[str, Any], arch: str, field: str, *keys: str) -> int:
    value = lookup(config, *keys)
    if value is MISSING:
        raise MissingConfigKey(arch, field, list(keys))
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterRefused(arch, field, f"{keys[0]} must be a positive integer, got {value!r}")
    return value


def rope_params(config: dict[str, Any], arch: str, *, theta_keys: tuple[str, ...], fraction_keys: tuple[str, ...],
                default_fraction: float) -> tuple[float, float]:
    """(rope_theta, rotary fraction) from transformers 5's `rope_parameters` or the older flat keys.

    Only plain RoPE maps: a scaled one (linear, dynamic, yarn, ...) is refused by name, since neither the
    CPU proof nor exllamav2's own readers of `rope_scaling` have been checked against it here.
    """
    rp = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    for source, block in (("rope_parameters", rp), ("rope_scaling", scaling or {})):
        kind = block.get("rope_type") or block.get("type")
        if kind not in (None, "default"):
            raise AdapterRefused(arch, f"{source}.rope_type = {kind!r}",
                                 "scaled RoPE is not mapped by the adapter (only plain RoPE is proven equivalent)")
    if scaling and not (scaling.get("rope_type") or scaling.get("type")):
        raise AdapterRefused(arch, "rope_scaling", f"rope_scaling = {scaling!r} is not mapped by the adapter")
    theta = lookup(rp, "rope_theta", default=lookup(config, *theta_keys, default=10000.0))
    fraction = lookup(rp, "partial_rotary_factor", default=lookup(config, *fraction_keys, default=default_fraction))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise AdapterRefused(arch, "rope_theta", f"rope_theta must be a positive number, got {theta!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise AdapterRefused(arch, "partial_rotary_factor", f"the rotary fraction must be in (0, 1], got {fraction!r}")
    return float(theta), float(fraction)


def check_rotary_dim(arch: str, head_dim: int, fraction: float) -> int:
    # transformers and exllamav2 (rope.py, attn.py) both take int(head_dim * fraction) rotary dims and
    # rotate NeoX-style halves of them. exllamav2's kernel (rope.cu rope_cuda_arr_neox) reads half2 pairs
    # at column c and c + dim/2, so dim/2 must be even too, or the second read is misaligned.
    dim = int(head_dim * fraction)
    if dim < 4 or dim % 4:
        raise AdapterRefused(arch, "partial_rotary_factor",
                             f"{head_dim} x {fraction} gives {dim} rotary dimensions; exllamav2's NeoX kernel needs a multiple of 4")
    return dim


def expect_tensors(arch: str, tensors: dict[str, TensorInfo], outs: list[Out], ignored: set[str]) -> list[Out]:
    """Refuse a checkpoint whose tensors differ from what the plan reads, naming the first few."""
    used = {o.source for o in outs if o.source is not None}
    missing = sorted(used - set(tensors))
    unexpected = sorted(set(tensors) - used - ignored)
    if missing:
        raise AdapterCheckpointMismatch(arch, f"missing tensors {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        raise AdapterCheckpointMismatch(arch, f"tensors the adapter does not know: {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
    return outs


def expect_shape(arch: str, tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...]) -> None:
    got = tensors[name].shape
    if tuple(got) != tuple(shape):
        raise AdapterCheckpointMismatch(arch, f"{name} has shape {list(got)}, config.json implies {list(shape)}")
