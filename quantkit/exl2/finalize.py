"""Make exllamav2's `-cf` folder publishable, in place and idempotently (a rerun after a kill redoes it).

compile.py copies every non-tensor file of the source: its README.md (the source's card, which would
then describe the wrong model) and its model.safetensors.index.json (which names the source's shards,
not `output*.safetensors`). Both go; a correct index is written from the shards' own headers, and
quantkit.json records how this branch was made.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from huggingface_hub.hf_api import parse_local_safetensors_file_metadata
from pydantic import BaseModel, ConfigDict

from quantkit.exl2.job import output_shards
from quantkit.files import current_umask, read_json, write_json_atomic
from quantkit.workfolder import BRANCH_PROVENANCE, BranchProvenance, read_branch_provenance, write_record

#: Source leftovers compile.py copies that must not be published with the quant.
STALE = ("README.md", ".gitattributes")
STALE_SUFFIXES = (".safetensors.index.json", ".pth", ".gguf", ".bin.index.json")
INDEX_NAME = "model.safetensors.index.json"
_Q_SUFFIXES = (".q_weight", ".q_invperm", ".q_scale", ".q_scale_max", ".q_groups", ".q_perm")


class Achieved(BaseModel):
    model_config = ConfigDict(frozen=True)

    decoder_bpw: float  # bits of the decoder's EXL2 tensors / decoder weights (optimize.py's measure)
    head_bpw: float
    bytes: int


def remove_stale(folder: Path) -> list[str]:
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.name in STALE or p.name.endswith(STALE_SUFFIXES)):
            p.unlink()
            removed.append(p.name)
    return removed


def write_index(folder: Path) -> dict[str, Any]:
    """A transformers-style index over the shards, from their safetensors headers."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in output_shards(folder):
        meta = parse_local_safetensors_file_metadata(shard)
        for name, t in meta.tensors.items():
            weight_map[name] = shard.name
            total += t.data_offsets[1] - t.data_offsets[0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(folder / INDEX_NAME, index)
    return index


def achieved_bits(folder: Path, *, decoder_weights: int, head_weights: int) -> Achieved:
    decoder = head = total = 0
    for shard in output_shards(folder):
        for name, t in parse_local_safetensors_file_metadata(shard).tensors.items():
            n = t.data_offsets[1] - t.data_offsets[0]
            total += n
            if not name.endswith(_Q_SUFFIXES):
                continue
            if ".layers." in name:
                decoder += n
            elif name.split(".")[-2] == "lm_head":
                head += n
    return Achieved(decoder_bpw=decoder * 8 / decoder_weights, head_bpw=head * 8 / head_weights if head_weights else 0.0, bytes=total)


def readable_modes(folder: Path) -> None:
    """Give the converter's files the modes the umask gives: safetensors writes its files owner-only
    (0600), which would keep the group from reading the published branch on a shared server."""
    mode = 0o666 & ~current_umask()
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) != mode:
            p.chmod(mode)


def stale_in_source(source_dir: Path) -> list[str]:
    """What compile.py copied from `source_dir` that `remove_stale` removes: the same list whether or not
    an earlier, killed finalize already removed some of it."""
    return sorted(p.name for p in source_dir.iterdir()
                  if p.is_file() and not p.name.endswith((".safetensors", ".bin")) and (p.name in STALE or p.name.endswith(STALE_SUFFIXES)))


def finalize(folder: Path, provenance: BranchProvenance, *, source_dir: Path | None = None) -> BranchProvenance:
    """Clean `folder`, write its index and quantkit.json; returns the provenance written.

    `source_dir` (the converter's `-i`) makes quantkit.json the same after a kill anywhere in here: what
    a killed first pass removed is no longer in `folder` to be seen."""
    removed = remove_stale(folder) + (stale_in_source(source_dir) if source_dir is not None else [])
    readable_modes(folder)
    write_index(folder)
    config = read_json(folder / "config.json")
    if "quantization_config" not in config:  # missing_compiled() already refused this; keep the guard local
        raise ValueError(f"{folder}/config.json has no quantization_config")
    earlier = read_branch_provenance(folder)  # a rerun after a kill: keep what the first pass removed
    kept = set(earlier.removed_from_source_copy) if earlier is not None else set()
    data = provenance.model_copy(update={"removed_from_source_copy": sorted(set(removed) | kept)})
    write_record(folder / BRANCH_PROVENANCE, data)
    return data
