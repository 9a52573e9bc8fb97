"""What a model is to quantkit: its config.json, its architecture entry, its shape and, when present,
its safetensors headers. Read from a local folder or a Hub repo id; never reads tensor data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    NotASafetensorsRepoError,
    RepositoryNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.hf_api import parse_local_safetensors_file_metadata
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict

from quantkit import archs, hub
from quantkit.archs import MISSING, ArchSpec, read_field
from quantkit.archs.adapters import AdapterPlan
from quantkit.errors import (
    ConfigMissing,
    ConfigUnreadable,
    CorruptSafetensors,
    HubRepoNotFound,
    MissingConfigKey,
    ModelNotFound,
)


class TensorHeader(BaseModel):
    """One tensor as its safetensors header describes it: no data."""

    model_config = ConfigDict(frozen=True)

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class ModelShape(BaseModel):
    """The hyperparameters the estimator and converter need, read once through the alias-tolerant reader."""

    model_config = ConfigDict(frozen=True)

    arch: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    experts: int | None
    experts_per_token: int | None
    partial_rotary: float
    rotary_dim: int
    sliding_window: int
    max_positions: int


class Model(BaseModel):
    """A model reference resolved to its config, architecture, shape and tensor headers."""

    model_config = ConfigDict(frozen=True)

    ref: str
    source: str  # "folder" | "hub"
    path: Path | None
    config: dict[str, Any]
    spec: ArchSpec
    shape: ModelShape
    tensors: dict[str, TensorHeader]
    #: The adapter's plan when exllamav2 lacks this architecture and an adapter maps it: then `spec` and
    #: `shape` are the adapted model's (what exllamav2 builds), `config` the source's.
    adapter: AdapterPlan | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None and self.source == "folder" else self.ref

    @property
    def is_exl2(self) -> bool:
        """A converted EXL2 folder: exllamav2 writes `.q_weight` tensors and a quantization_config."""
        qc = self.config.get("quantization_config") or {}
        return qc.get("quant_method") == "exl2" or any(k.endswith(".q_weight") for k in self.tensors)


def _int(config: dict[str, Any], arch: str, field: str, default: Any = MISSING) -> int:
    value = read_field(config, field, default)
    if value is MISSING:
        raise MissingConfigKey(arch, field, archs.field_aliases(field))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise ConfigUnreadable(Path("config.json"), f"{field} must be a non-negative integer, got {value!r}")
    return int(value)


def read_shape(config: dict[str, Any], spec: ArchSpec) -> ModelShape:
    """The model's shape as exllamav2 0.3.2's `ExLlamaV2Config.prepare` would read it."""
    arch = spec.name
    layers = _int(config, arch, "layers")
    hidden = _int(config, arch, "hidden")
    heads = _int(config, arch, "heads", spec.default_heads or 0)
    head_dim_default = spec.default_head_dim or (hidden // heads if heads else MISSING)
    head_dim = _int(config, arch, "head_dim", head_dim_default)
    if not heads:
        heads = hidden // head_dim
    # config.py: mqa architectures (GPTBigCode) have one KV head whatever config.json says.
    kv_heads = 1 if spec.mqa else _int(config, arch, "kv_heads", spec.default_kv_heads or heads)
    inter_default = spec.default_inner_dim_mult * hidden if spec.default_inner_dim_mult else MISSING
    intermediate = _int(config, arch, "intermediate", inter_default)
    experts = experts_per_token = None
    if spec.moe:
        # config.py: MoE models size each expert by moe_intermediate_size when present (Qwen3-MoE).
        intermediate = _int(config, arch, "moe_intermediate", intermediate)
        experts = _int(config, arch, "experts")
        experts_per_token = _int(config, arch, "experts_per_token", 2)
    vocab = _int(config, arch, "vocab", spec.default_vocab or MISSING)
    prf = read_field(config, "partial_rotary", 1.0)
    if not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ConfigUnreadable(Path("config.json"), f"partial_rotary_factor must be in (0, 1], got {prf!r}")
    rotary_dim = 0 if spec.rope == "none" else int(head_dim * prf)
    return ModelShape(
        arch=arch,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied_embeddings=bool(read_field(config, "tied", spec.tied_default)),
        experts=experts,
        experts_per_token=experts_per_token,
        partial_rotary=float(prf),
        rotary_dim=rotary_dim,
        sliding_window=_int(config, arch, "sliding_window", 0),
        max_positions=_int(config, arch, "max_positions", spec.default_max_positions),
    )


def _read_config_file(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigMissing(path)
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigUnreadable(cfg, f"cannot read it ({exc.__class__.__name__}: {exc})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigUnreadable(cfg, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise ConfigUnreadable(cfg, "not a JSON object")
    return data


def _headers(info: Any) -> dict[str, TensorHeader]:
    return {
        name: TensorHeader(dtype=t.dtype, shape=tuple(t.shape), nbytes=t.data_offsets[1] - t.data_offsets[0])
        for name, t in info.tensors.items()
    }


def read_local_tensors(path: Path) -> dict[str, TensorHeader]:
    """Headers of every `*.safetensors` shard in a folder (exllamav2's output has no index file)."""
    tensors: dict[str, TensorHeader] = {}
    for shard in sorted(path.glob("*.safetensors")):
        try:
            tensors.update(_headers(parse_local_safetensors_file_metadata(shard)))
        except SafetensorsParsingError as exc:
            raise CorruptSafetensors(str(shard), "its header cannot be parsed") from exc
        except OSError as exc:
            raise CorruptSafetensors(str(shard), f"cannot be read ({exc})") from exc
    return tensors


def _model(ref: str, source: str, path: Path | None, config: dict[str, Any], tensors: dict[str, TensorHeader]) -> Model:
    r = archs.resolve_model(config)
    return Model(ref=ref, source=source, path=path, config=config, spec=r.spec, shape=read_shape(r.config, r.spec),
                 tensors=tensors, adapter=r.adapter)


def load_model(ref: str | Path, *, read_tensors: bool = True) -> Model:
    """Resolve `ref` (a local folder, or a Hub repo id when no such folder exists) without reading weights.

    Raises:
        ConfigMissing, ConfigUnreadable, UnsupportedArchitecture, MissingConfigKey, CorruptSafetensors,
        HubOffline, HubRepoNotFound, ModelNotFound.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        config = _read_config_file(path)
        return _model(text, "folder", path, config, read_local_tensors(path) if read_tensors else {})
    if path.is_file():
        raise ConfigUnreadable(path, "a model is a folder holding config.json, not a file")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ModelNotFound(text) from None
    if "/" not in text:
        raise ModelNotFound(text)
    return load_hub_model(text, read_tensors=read_tensors)


def load_hub_model(repo_id: str, *, revision: str | None = None, read_tensors: bool = True) -> Model:
    hub.ensure_reachable(repo_id)
    api = hub.get_hf_api()
    try:
        cfg_path = api.hf_hub_download(repo_id, "config.json", revision=revision)
        config = _read_config_file(Path(cfg_path).parent)
        tensors: dict[str, TensorHeader] = {}
        if read_tensors:
            try:
                meta = api.get_safetensors_metadata(repo_id, revision=revision)
                for info in meta.files_metadata.values():
                    tensors.update(_headers(info))
            except NotASafetensorsRepoError:
                tensors = {}
    except GatedRepoError as exc:
        raise HubRepoNotFound(repo_id, "(gated: accept its licence on the Hub and log in with `hf auth login`)") from exc
    except RepositoryNotFoundError as exc:
        raise HubRepoNotFound(repo_id) from exc
    except SafetensorsParsingError as exc:
        raise CorruptSafetensors(repo_id, "a safetensors header on the Hub cannot be parsed") from exc
    return _model(repo_id, "hub", None, config, tensors)
