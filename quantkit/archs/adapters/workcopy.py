"""Writing an adapter's working copy: the one place that touches files.

Rules:
- The user's folder is only read. `dst` may not be `src`, inside it, or hold it; an existing `dst` must be
  empty or a previous working copy (it holds `quantkit-adapter.json`), which is replaced.
- Everything is checked before anything is written: the config (adapter.check), the destination, and the
  checkpoint's tensor names and shapes (adapter.tensor_plan).
- The copy is built in a hidden sibling folder and renamed into place, so a crash leaves no half copy.
- A source shard whose tensors all pass through unchanged is hard-linked (copied when the filesystem
  cannot link); every other tensor is written into new shards with safetensors' numpy API.
- Tokenizer and generation files are copied; config.json is the adapter's; a fresh
  model.safetensors.index.json maps every tensor; `quantkit-adapter.json` records the provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit.archs.adapters.base import PROVENANCE_FILE, AdaptedModel, Adapter, Out, TensorInfo
from quantkit.errors import AdapterTargetInvalid, CorruptSafetensors, MissingExtra, NoWeights
from quantkit.hfconfig import read_config_file

#: Files copied beside the weights: what exllamav2 and the loaders read for tokenizing and generation.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.json", "chat_template.jinja",
)
#: New shards are cut at this size (exllamav2 reads any number of shards).
SHARD_BYTES = 4 * 1024**3
NEW_SHARD = "model-adapted-{:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_source_config(src: Path) -> dict[str, Any]:
    return read_config_file(src)


def check_destination(src: Path, dst: Path) -> None:
    """Raise `AdapterTargetInvalid` unless `dst` is a safe place for the working copy of `src`."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise AdapterTargetInvalid(src, dst, "is the model folder itself; the working copy is never written over it")
    if d.is_relative_to(s):
        raise AdapterTargetInvalid(src, dst, "is inside the model folder; the working copy is never written into it")
    if s.is_relative_to(d):
        raise AdapterTargetInvalid(src, dst, "contains the model folder; replacing it would delete the model")
    if d.exists():
        if not d.is_dir():
            raise AdapterTargetInvalid(src, dst, "exists and is not a folder")
        if any(d.iterdir()) and not (d / PROVENANCE_FILE).is_file():
            raise AdapterTargetInvalid(src, dst, "exists and holds files that are not a quantkit working copy")


def _numpy() -> Any:
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safetensors' numpy API reads/writes BF16
    import numpy as np

    return np


def _dtype(name: str) -> Any:
    import ml_dtypes

    np = _numpy()
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[name]


class _Reader:
    """Source tensors by name, from safetensors shards or (needing torch) pytorch_model*.bin files."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.shards = sorted(src.glob("*.safetensors"))
        self.bins = [] if self.shards else sorted(src.glob("pytorch_model*.bin"))
        if not self.shards and not self.bins:
            raise NoWeights(src)
        self._open: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}

    def headers(self) -> dict[str, TensorInfo]:
        from huggingface_hub.errors import SafetensorsParsingError
        from huggingface_hub.hf_api import parse_local_safetensors_file_metadata

        out: dict[str, TensorInfo] = {}
        for shard in self.shards:
            try:
                meta = parse_local_safetensors_file_metadata(shard)
            except (SafetensorsParsingError, OSError) as exc:
                raise CorruptSafetensors(str(shard), "its header cannot be parsed") from exc
            for name, t in meta.tensors.items():
                out[name] = TensorInfo(dtype=t.dtype, shape=tuple(t.shape), file=shard.name)
        for path in self.bins:
            names = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32", "torch.float64": "F64"}
            for name, t in self._bin(path).items():
                out[name] = TensorInfo(dtype=names.get(str(t.dtype), str(t.dtype)), shape=tuple(t.shape), file=path.name)
        return out

    def _bin(self, path: Path) -> dict[str, Any]:
        if path.name not in self._open:
            try:
                import torch
            except ImportError as exc:
                raise MissingExtra("torch", f"read {path.name} (this model has no safetensors weights)") from exc
            self._open[path.name] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path.name]

    def get(self, name: str, info: TensorInfo) -> Any:
        if name in self._cache:
            return self._cache[name]
        if len(self._cache) > 4:  # q/k/v weight and bias of one layer are read in turn
            self._cache.clear()
        if info.file.endswith(".safetensors"):
            from safetensors import safe_open

            _numpy()
            if info.file not in self._open:
                self._open[info.file] = safe_open(str(self.src / info.file), framework="numpy")
            arr = self._open[info.file].get_tensor(name)
        else:
            import torch

            t = self._bin(self.src / info.file)[name]
            arr = t.view(torch.int16).numpy().view(_dtype("BF16")) if t.dtype == torch.bfloat16 else t.numpy()
        self._cache[name] = arr
        return arr


def _layout(tensors: dict[str, TensorInfo], outs: list[Out]) -> tuple[dict[str, list[str]], set[str]]:
    """Tensor names per source file, and the safetensors shards whose tensors all pass through unchanged."""
    by_file: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    users: dict[str, list[Out]] = {}
    for o in outs:
        if o.source is not None:
            users.setdefault(o.source, []).append(o)
    linkable = {f for f, names in by_file.items() if f.endswith(".safetensors")
                and all(len(users.get(n, [])) == 1 and users[n][0].identity for n in names)}
    return by_file, linkable


def disk_need(adapter: Adapter, src: Path, dst: Path) -> int:
    """Bytes the working copy of `src` takes in `dst`: the rewritten tensors, plus the pass-through shards
    when they cannot be hard-linked (another filesystem). Reads headers only.

    Raises:
        as `prepare`, for the checks it shares (config, weights, checkpoint).
    """
    plan = adapter.check(read_source_config(src))
    tensors = _Reader(src).headers()
    outs = adapter.tensor_plan(plan, tensors)
    _by_file, linkable = _layout(tensors, outs)
    written = sum(_out_bytes(o, tensors) for o in outs if o.source is None or tensors[o.source].file not in linkable)
    probe = dst
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    same_fs = probe.exists() and os.stat(probe).st_dev == os.stat(src).st_dev
    linked = 0 if same_fs else sum((src / f).resolve().stat().st_size for f in linkable)
    return written + linked


def is_current(dst: Path, src: Path, plan: Any) -> bool:
    """True when `dst` holds a complete working copy of `src` made with `plan` (an AdapterPlan): its
    provenance names the same plan and source config, every file it lists is there, pass-through shards
    have the source's sizes, and no stray shard would be read by the converter. Anything else is rebuilt."""
    try:
        prov = json.loads((dst / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(prov, dict) or prov.get("plan") != plan.model_dump(mode="json"):
        return False
    try:
        if prov.get("source_config_sha256") != hashlib.sha256((src / "config.json").read_bytes()).hexdigest():
            return False
        sizes = {f: (src / f).stat().st_size for f in prov.get("source_files", {})}
    except OSError:
        return False
    if sizes != prov.get("source_files"):
        return False
    files: dict[str, str] = prov.get("files", {})
    if {p.name for p in dst.glob("*.safetensors")} != {f for f in files if f.endswith(".safetensors")}:
        return False
    for name, how in files.items():
        path = dst / name
        if not path.is_file():
            return False
        if how in ("linked", "copied") and name in sizes and path.stat().st_size != sizes[name]:
            return False
    return True


def _out_bytes(o: Out, tensors: dict[str, TensorInfo]) -> int:
    if o.source is None:
        assert o.zeros is not None
        shape, dtype = o.zeros
        return _nbytes(TensorInfo(dtype=dtype, shape=tuple(shape), file=""))
    info = tensors[o.source]
    whole = _nbytes(info)
    return whole if o.rows is None else whole // info.shape[0] * len(o.rows)


def _link(src: Path, dst: Path) -> str:
    try:
        os.link(src.resolve(), dst)  # resolve: Hub cache snapshots are symlinks into blobs/
        return "linked"
    except OSError:
        shutil.copy2(src.resolve(), dst)
        return "copied"


def prepare(adapter: Adapter, src: Path, dst: Path) -> AdaptedModel:
    """Check everything, then write the working copy of `src` into `dst` (see the module docstring).

    Raises:
        AdapterRefused, MissingConfigKey, AdapterTargetInvalid, NoWeights, CorruptSafetensors,
        AdapterCheckpointMismatch, MissingExtra.
    """
    config = read_source_config(src)
    plan = adapter.check(config)
    check_destination(src, dst)
    reader = _Reader(src)
    tensors = reader.headers()
    outs = adapter.tensor_plan(plan, tensors)

    by_file, linkable = _layout(tensors, outs)

    partial = dst.parent / f".{dst.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    files: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    total = written = 0
    try:
        for f in sorted(linkable):
            files[f] = _link(src / f, partial / f)
        pending: dict[str, Any] = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes, written
            if not pending:
                return
            from safetensors.numpy import save_file

            name = NEW_SHARD.format(sum(1 for v in files.values() if v == "written") + 1)
            assert not (partial / name).exists()
            save_file(pending, str(partial / name), metadata={"format": "pt"})
            files[name] = "written"
            for t in pending:
                weight_map[t] = name
            written += pending_bytes
            pending, pending_bytes = {}, 0

        np = _numpy()
        for o in outs:
            if o.source is not None and tensors[o.source].file in linkable:
                weight_map[o.name] = tensors[o.source].file
                total += _nbytes(tensors[o.source])
                continue
            if o.zeros is not None:
                shape, dtype = o.zeros
                arr = np.zeros(shape, dtype=_dtype(dtype))
            else:
                assert o.source is not None
                arr = reader.get(o.source, tensors[o.source])
                if o.rows is not None:
                    arr = np.ascontiguousarray(arr[list(o.rows)])
            pending[o.name] = arr
            pending_bytes += arr.nbytes
            total += arr.nbytes
            if pending_bytes >= SHARD_BYTES:
                flush()
        flush()

        (partial / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n", encoding="utf-8")
        files["config.json"] = "written"
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2((src / name).resolve(), partial / name)
                files[name] = "copied"
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        files[INDEX_FILE] = "written"
        provenance = {
            "quantkit": __version__,
            "plan": plan.model_dump(mode="json"),
            "source": str(src.resolve()),
            "source_config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest(),
            "source_files": {f: (src / f).stat().st_size for f in sorted(by_file)},
            "files": dict(sorted(files.items())),
        }
        (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        files[PROVENANCE_FILE] = "written"
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)  # a previous working copy: check_destination allowed nothing else
    partial.rename(dst)
    return AdaptedModel(path=dst, source=src, plan=plan, files=dict(sorted(files.items())), tensors=len(outs), written_bytes=written)


def _nbytes(info: TensorInfo) -> int:
    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(info.dtype, 1)
    for n in info.shape:
        size *= n
    return size
