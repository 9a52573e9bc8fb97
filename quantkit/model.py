"""What a model is to quantkit: its config.json, its architecture entry, its shape and, when present,
its safetensors headers. Read from a local folder or a Hub repo id; never reads tensor data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    NotASafetensorsRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.hf_api import parse_local_safetensors_file_metadata
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict

from quantkit import archs, hub
from quantkit.archs import ArchSpec, read_field
from quantkit.archs.adapters import AdapterPlan
from quantkit.hfconfig import MISSING, read_config_file
from quantkit.errors import (
    ConfigMissing,
    ConfigUnreadable,
    CorruptSafetensors,
    HubOffline,
    HubRepoNotFound,
    HubRevisionNotFound,
    InvalidModelShape,
    MissingConfigKey,
    ModelNotFound,
    NotExl2Branch,
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
    source: str  # "folder" | "hub" | "hub cache" (offline, from the local Hugging Face cache)
    path: Path | None
    revision: str | None = None
    config: dict[str, Any]
    spec: ArchSpec
    shape: ModelShape
    tensors: dict[str, TensorHeader]
    #: The adapter's plan when exllamav2 lacks this architecture and an adapter maps it: then `spec` and
    #: `shape` are the adapted model's (what exllamav2 builds), `config` the source's.
    adapter: AdapterPlan | None = None

    @property
    def name(self) -> str:
        if self.path is not None and self.source == "folder":
            return self.path.name
        return f"{self.ref}:{self.revision}" if self.revision else self.ref

    @property
    def exl2_bits(self) -> float | None:
        """The bitrate the converter targeted (config.json quantization_config.bits), for a converted model."""
        bits = (self.config.get("quantization_config") or {}).get("bits")
        return float(bits) if self.is_exl2 and isinstance(bits, (int, float)) and not isinstance(bits, bool) else None

    @property
    def exl2_head_bits(self) -> int | None:
        hb = (self.config.get("quantization_config") or {}).get("head_bits")
        return int(hb) if self.is_exl2 and isinstance(hb, (int, float)) and not isinstance(hb, bool) else None

    @property
    def native_override(self) -> archs.NativeOverride | None:
        return archs.native_override(self.config, self.ref, self.shape.max_positions)

    @property
    def native_context(self) -> int:
        """The context the weights were trained for: max_position_embeddings, unless `native_context.toml`
        knows the config was edited to claim more."""
        o = self.native_override
        return o.native if o is not None else self.shape.max_positions

    def headers_describe(self, bits: float) -> bool:
        """Whether the safetensors headers are the weights at `bits`: a converted model with tensors, asked
        at its own bitrate (or of unknown bitrate). Other bitrates are sized from bits x parameters."""
        if not (self.is_exl2 and self.tensors):
            return False
        return self.exl2_bits is None or abs(self.exl2_bits - bits) < 0.005

    @property
    def is_exl2(self) -> bool:
        """A converted EXL2 folder: exllamav2 writes `.q_weight` tensors and a quantization_config."""
        qc = self.config.get("quantization_config") or {}
        return qc.get("quant_method") == "exl2" or any(k.endswith(".q_weight") for k in self.tensors)


def _int(config: dict[str, Any], arch: str, field: str, default: Any = MISSING) -> int:
    value = read_field(config, field, default)
    if value is MISSING:
        raise MissingConfigKey(arch, field, archs.field_aliases(field))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
        raise ConfigUnreadable(Path("config.json"), f"{field} must be a whole number, got {value!r}")
    if value < 0:
        raise InvalidModelShape(arch, field, value, "must not be negative")
    return int(value)


#: (lowest, highest) a real model has, per field, with a wide margin: the largest published models have
#: ~130 layers, hidden 16-25k, 128 heads, head_dim 256, intermediate ~53k, a 262k vocabulary and up to
#: 10M positions. Anything outside is a typo or a broken config, refused before it is planned.
SHAPE_LIMITS: dict[str, tuple[int, int]] = {
    "layers": (1, 1024),
    "hidden": (1, 2**17),
    "heads": (1, 4096),
    "kv_heads": (1, 4096),
    "head_dim": (1, 2048),
    "intermediate": (1, 2**20),
    "vocab": (1, 2**22),
    "experts": (1, 4096),
    "max_positions": (1, 10**8),
}


def check_shape(shape: ModelShape, *, head_dim_given: bool) -> ModelShape:
    """Refuse shapes no model has, naming the field (`InvalidModelShape`): sizes out of `SHAPE_LIMITS`,
    attention heads that do not divide the hidden size when config.json gives no head_dim (exllamav2
    would compute a truncated head size), KV heads that do not divide the attention heads (GQA groups
    must be whole)."""
    arch = shape.arch
    for field, (lo, hi) in SHAPE_LIMITS.items():
        value = getattr(shape, field)
        if value is None:
            continue
        if value < lo:
            raise InvalidModelShape(arch, field, value, f"must be at least {lo}")
        if value > hi:
            raise InvalidModelShape(arch, field, value, f"is beyond {hi:,}, far more than any real model")
    if not head_dim_given and shape.hidden % shape.heads:
        raise InvalidModelShape(arch, "heads", shape.heads,
                                f"does not divide hidden_size {shape.hidden} and config.json gives no head_dim")
    if shape.heads % shape.kv_heads:
        raise InvalidModelShape(arch, "kv_heads", shape.kv_heads,
                                f"does not divide the {shape.heads} attention heads (each KV head serves a whole group)")
    return shape


def read_shape(config: dict[str, Any], spec: ArchSpec) -> ModelShape:
    """The model's shape as exllamav2 0.3.2's `ExLlamaV2Config.prepare` would read it, checked by
    `check_shape` (raises `InvalidModelShape` naming the field)."""
    arch = spec.name
    layers = _int(config, arch, "layers")
    hidden = _int(config, arch, "hidden")
    heads = _int(config, arch, "heads", spec.default_heads or 0)
    head_dim_given = read_field(config, "head_dim") is not MISSING or bool(spec.default_head_dim)
    if not heads and not head_dim_given:
        if read_field(config, "heads") is MISSING:
            raise MissingConfigKey(arch, "heads", archs.field_aliases("heads"))
        raise InvalidModelShape(arch, "heads", heads, "must be at least 1")
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
    if not heads:
        raise InvalidModelShape(arch, "head_dim", head_dim, f"is larger than hidden_size {hidden}, so there are no heads")
    shape = ModelShape(
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
    return check_shape(shape, head_dim_given=head_dim_given)


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


def _model(ref: str, source: str, path: Path | None, config: dict[str, Any], tensors: dict[str, TensorHeader],
           revision: str | None = None) -> Model:
    r = archs.resolve_model(config)
    return Model(ref=ref, source=source, path=path, config=config, spec=r.spec, shape=read_shape(r.config, r.spec),
                 tensors=tensors, adapter=r.adapter, revision=revision)


def split_ref(text: str) -> tuple[str, str | None]:
    """"USER/REPO:BRANCH" -> ("USER/REPO", "BRANCH"), the form text-generation-webui and the cards use for
    one published branch; anything else -> (text, None)."""
    repo, sep, branch = text.rpartition(":")
    if sep and "/" in repo and branch and "/" not in branch:
        return repo, branch
    return text, None


def load_model(ref: str | Path, *, revision: str | None = None, read_tensors: bool = True) -> Model:
    """Resolve `ref` without reading weights: a local folder, or a Hub repo id when no such folder exists.

    `USER/REPO:BRANCH` names one published branch, which must hold a converted EXL2 model; `revision`
    reads a Hub repo at any branch, tag or commit. Offline, the local Hugging Face cache is used.

    Raises:
        ConfigMissing, ConfigUnreadable, UnsupportedArchitecture, MissingConfigKey, InvalidModelShape,
        CorruptSafetensors, HubOffline, HubRepoNotFound, HubRevisionNotFound, NotExl2Branch, ModelNotFound.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        config = read_config_file(path)
        return _model(text, "folder", path, config, read_local_tensors(path) if read_tensors else {})
    if path.is_file():
        raise ConfigUnreadable(path, "a model is a folder holding config.json, not a file")
    repo_id, branch = split_ref(text)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFound(text) from None
    if "/" not in repo_id:
        raise ModelNotFound(text)
    return load_hub_model(repo_id, revision=branch or revision, read_tensors=read_tensors, require_exl2=branch is not None)


def load_hub_model(repo_id: str, *, revision: str | None = None, read_tensors: bool = True,
                   require_exl2: bool = False) -> Model:
    """A Hub model through the one HfApi seam: config.json and the safetensors headers, never weights.

    Offline (or unreachable), a config.json already in the Hugging Face cache is used, with whatever
    shards of that revision the cache holds."""
    try:
        hub.ensure_reachable(repo_id)
    except HubOffline:
        cached = _from_cache(repo_id, revision, read_tensors)
        if cached is None:
            raise
        return _checked_exl2(cached, repo_id, revision, require_exl2)
    api = hub.get_hf_api()
    try:
        cfg_path = api.hf_hub_download(repo_id, "config.json", revision=revision)
        config = read_config_file(Path(cfg_path).parent)
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
    except RevisionNotFoundError as exc:
        raise HubRevisionNotFound(repo_id, str(revision), _branches(api, repo_id)) from exc
    except EntryNotFoundError as exc:
        if revision is not None:
            raise NotExl2Branch(repo_id, revision, "it holds no config.json") from exc
        raise ConfigMissing(Path(repo_id)) from exc
    except SafetensorsParsingError as exc:
        raise CorruptSafetensors(repo_id, "a safetensors header on the Hub cannot be parsed") from exc
    return _checked_exl2(_model(repo_id, "hub", None, config, tensors, revision), repo_id, revision, require_exl2)


def _checked_exl2(model: Model, repo_id: str, revision: str | None, require_exl2: bool) -> Model:
    if require_exl2 and not model.is_exl2:
        raise NotExl2Branch(repo_id, str(revision), "its config.json has no quantization_config with quant_method exl2")
    return model


def _branches(api: Any, repo_id: str) -> list[str]:
    """The repo's branch names for the error message; none when even that fails."""
    try:
        return sorted(b.name for b in api.list_repo_refs(repo_id).branches)
    except Exception:  # noqa: BLE001 - only a hint in a message that reports the real error
        return []


def _from_cache(repo_id: str, revision: str | None, read_tensors: bool) -> Model | None:
    cfg = hub.cached_file(repo_id, "config.json", revision=revision)
    if cfg is None:
        return None
    snapshot = cfg.parent
    config = read_config_file(snapshot)
    tensors = read_local_tensors(snapshot) if read_tensors else {}
    return _model(repo_id, "hub cache", None, config, tensors, revision)
