"""exllamav2's measurement.json: reading it, the bitrates it can reach, and quantkit's provenance for it.

measurement.json is `{"measurement": {"<prefix>model.layers.<i>.<self_attn|mlp|block_sparse_moe>": [option, ...]},
"last_module_idx": n}`; each option carries `accuracy`, `total_bits` and the QParams of each projection.
optimize.py fits `int(numel * bits)` with one option per (layer, attention|MLP) slot, so the reachable
decoder bitrates run from the sum of the cheapest options to the sum of the dearest, divided by the
decoder's weight count. `total_bits` already holds the fixed costs (scales, groups, the 32-bit
q_invperm per row), which is why 2.0 is out of reach and 8.0 is just inside.

The file says nothing about where it came from; `MeasurementProvenance` (WORK/measurement.provenance.json,
the record in quantkit.workfolder) does.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from quantkit.errors import MeasurementCorrupt, MeasurementMismatch, UnreachableBits
from quantkit.model import Model
from quantkit.vram import decoder_linears
from quantkit.workfolder import AdapterRecord, MeasurementProvenance, read_record

_KEY = re.compile(r"^(?P<prefix>.*?)model\.layers\.(?P<layer>\d+)\.(?P<mode>self_attn|mlp|block_sparse_moe|parallel_decoder)$")

#: config.json keys that change without changing the weights (a re-save, a hub rename).
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "use_cache")
#: Bytes of tensor data per shard hashed into the fingerprint, so two fine-tunes of one base differ.
DATA_SAMPLE_BYTES = 64 * 1024


class Option(BaseModel):
    model_config = ConfigDict(frozen=True)

    total_bits: int
    accuracy: float


class Measurement(BaseModel):
    """A parsed measurement.json: per (layer, attention|MLP) slot, its options."""

    model_config = ConfigDict(frozen=True)

    path: Path
    sha256: str
    slots: dict[tuple[int, str], list[Option]]  # (layer, "attn" | "mlp")


class BitRange(BaseModel):
    """Decoder bits per weight a measurement can reach (what `-b` targets; lm_head is separate)."""

    model_config = ConfigDict(frozen=True)

    low: float
    high: float
    decoder_weights: int

    def contains(self, bits: float) -> bool:
        return self.low <= bits <= self.high


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _options(path: Path, key: str, raw: Any) -> list[Option]:
    if not isinstance(raw, list) or not raw:
        raise MeasurementCorrupt(path, f"{key} has no options")
    try:
        return [Option(total_bits=int(o["total_bits"]), accuracy=float(o["accuracy"])) for o in raw]
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise MeasurementCorrupt(path, f"{key} has an option without total_bits/accuracy ({exc.__class__.__name__})") from exc


def load_measurement(path: Path) -> Measurement:
    """Parse and validate a measurement.json.

    Raises:
        MeasurementCorrupt: unreadable, not exllamav2's format (exllamav2 itself dies on `KeyError: 'measurement'`).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MeasurementCorrupt(path, "no such file") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MeasurementCorrupt(path, f"not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("measurement"), dict) or "last_module_idx" not in data:
        raise MeasurementCorrupt(path, "not an exllamav2 measurement (needs \"measurement\" and \"last_module_idx\")")
    slots: dict[tuple[int, str], list[Option]] = {}
    for key, raw in data["measurement"].items():
        m = _KEY.match(key)
        if not m:
            continue
        layer = int(m.group("layer"))
        if m.group("mode") == "parallel_decoder":
            if not isinstance(raw, dict):
                raise MeasurementCorrupt(path, f"{key} is not an attn/mlp pair")
            slots[(layer, "attn")] = _options(path, key + ".attn", raw.get("attn"))
            slots[(layer, "mlp")] = _options(path, key + ".mlp", raw.get("mlp"))
        else:
            slots[(layer, "attn" if m.group("mode") == "self_attn" else "mlp")] = _options(path, key, raw)
    if not slots:
        raise MeasurementCorrupt(path, "it holds no decoder layer measurements")
    return Measurement(path=path, sha256=file_sha256(path), slots=slots)


def slot_weights(model: Model) -> tuple[int, int]:
    """Weights per layer in the attention slot and the MLP slot (attn.py / mlp.py / moe_mlp.py numel():
    linear in x out only; norms count 0)."""
    lin = decoder_linears(model.shape, model.spec)
    return sum(i * o for i, o in lin[:4]), sum(i * o for i, o in lin[4:])


def reachable_range(measurement: Measurement, model: Model) -> BitRange:
    """The decoder bitrates optimize.py can fit with this measurement on this model.

    Raises:
        MeasurementMismatch: the measurement does not cover exactly the model's layers.
    """
    want = {(i, k) for i in range(model.shape.layers) for k in ("attn", "mlp")}
    if set(measurement.slots) != want:
        layers = len({layer for layer, _ in measurement.slots})
        raise MeasurementMismatch(measurement.path, "decoder layers", layers, model.shape.layers)
    attn, mlp = slot_weights(model)
    numel = model.shape.layers * (attn + mlp)
    low = sum(min(o.total_bits for o in opts) for opts in measurement.slots.values())
    high = sum(max(o.total_bits for o in opts) for opts in measurement.slots.values())
    return BitRange(low=low / numel, high=high / numel, decoder_weights=numel)


def check_reachable(bits: float, rng: BitRange) -> None:
    """Refuse a target outside the range: below it exllamav2's optimizer cannot fit the budget (it has
    spun for hours on such targets, exllamav2 #139/#101); above it every slot is already at its best.

    Raises:
        UnreachableBits.
    """
    if not rng.contains(bits):
        raise UnreachableBits(bits, rng.low, rng.high)


# ---- provenance -------------------------------------------------------------------------------------


def model_fingerprint(model: Model) -> str:
    """sha256 of config.json (less volatile keys), every tensor's header (name, dtype, shape, bytes) and,
    for a local folder, the first 64 KiB of each shard's data: headers alone cannot tell two
    fine-tunes of one base apart."""
    config = {k: v for k, v in model.config.items() if k not in VOLATILE_CONFIG_KEYS}
    headers = {name: [t.dtype, list(t.shape), t.nbytes] for name, t in sorted(model.tensors.items())}
    h = hashlib.sha256(json.dumps({"config": config, "tensors": headers}, sort_keys=True).encode())
    if model.path is not None:
        for shard in sorted(model.path.glob("*.safetensors")):
            with shard.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                fh.seek(8 + n)
                h.update(fh.read(DATA_SAMPLE_BYTES))
    return h.hexdigest()


def make_provenance(model: Model, fingerprint: str, *, measurement: Path, calibration: str, calibration_sha256: str,
                    rows: int, length: int, exllamav2_version: str, adapter: AdapterRecord | None = None) -> MeasurementProvenance:
    return MeasurementProvenance(
        model_ref=model.ref, model_fingerprint=fingerprint, calibration=calibration,
        calibration_sha256=calibration_sha256, rows=rows, length=length, exllamav2_version=exllamav2_version,
        measurement_sha256=file_sha256(measurement), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        adapter=adapter,
    )


def provenance_path(measurement: Path) -> Path:
    return measurement.with_name(measurement.stem + ".provenance.json")


def read_provenance(measurement: Path) -> MeasurementProvenance:
    """Raises: MeasurementCorrupt (no record beside it), WorkFolderCorrupt, WorkFolderIncompatible."""
    path = provenance_path(measurement)
    prov = read_record(MeasurementProvenance, path)
    if prov is None:
        raise MeasurementCorrupt(measurement, f"it has no provenance record ({path.name}); measure again with `quantkit measure`")
    return prov


def check_provenance(measurement: Path, prov: MeasurementProvenance, *, fingerprint: str) -> None:
    """Refuse a measurement made from another model, or edited after it was recorded.

    Raises:
        MeasurementMismatch.
    """
    if prov.model_fingerprint != fingerprint:
        raise MeasurementMismatch(measurement, "model", prov.model_ref, "this model")
    actual = file_sha256(measurement)
    if prov.measurement_sha256 != actual:
        raise MeasurementMismatch(measurement, "sha256", prov.measurement_sha256[:12], actual[:12])
