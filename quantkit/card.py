"""The README of a published EXL2 repo: front matter, prompt format, the "Available sizes" table.

`card_spec` gathers the facts from a work folder (real branch sizes once converted) or a model folder
(the planner's figures); `render_card` fills `templates/card.md.j2`. The front matter names the source
as `base_model` (never the source's own base_model) and parses back through huggingface_hub's ModelCard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from pydantic import BaseModel, ConfigDict

from quantkit import EXLLAMAV2_VERSION
from quantkit.branches import Branch, default_branches
from quantkit.errors import CardInvalid, WorkFolderIncomplete
from quantkit.eval.card import CardQuality, card_quality
from quantkit.eval.core import failed_branches
from quantkit.model import Model, load_model
from quantkit.plan import Plan, make_plan
from quantkit.prompt_format import PromptFormat, prompt_format
from quantkit.source import identify, read_source
from quantkit.tables import cache_statement, markdown_table
from quantkit.vram import CacheMode
from quantkit.workfolder import (
    MEASUREMENT,
    converted_branches,
    is_work_folder,
    read_branch_provenance,
    read_provenance,
    read_settings,
    source_model,
)

CONTEXTS = (4096, 8192, 16384, 32768)
QUANTKIT_TAGS = ("exl2", "exllamav2", "quantized")
TEMPLATE = "card.md.j2"
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json", "chat_template.jinja")


class CardSpec(BaseModel):
    """Everything the card says, gathered before rendering (tests and `--json` read it)."""

    model_config = ConfigDict(frozen=True)

    source: str  # the source as the user named it
    base_model: str | None  # its Hub id, when known
    repo: str  # where the quants are published (a placeholder when not given)
    quantized_by: str | None
    license: str | None
    license_name: str | None
    license_link: str | None
    language: str | list[str] | None = None  # carried from the source card
    datasets: str | list[str] | None = None
    pipeline_tag: str = "text-generation"
    source_tags: list[str] = []
    exllamav2_version: str
    calibration: str
    prompt: PromptFormat
    plan: Plan
    sizes: dict[str, int]  # branch -> bytes of its safetensors
    cache: str
    converted: bool
    source_card: str | None
    notes: list[str]  # said on screen, never in the card
    adapter: str | None = None  # the architecture adapter exllamav2 needed, and its status
    quality: CardQuality | None = None  # KL / PPL per branch and the chart, once evaluated


def _source_folder(ref: str | None) -> Path | None:
    # A relative path is as the user named it where the work ran; the recorded absolute path comes first.
    if ref and Path(ref).expanduser().is_dir():
        return Path(ref).expanduser()
    return None


class SourceCard(BaseModel):
    """The source's own README: its metadata (None when its front matter does not parse) and its body."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    data: ModelCardData | None
    text: str


def _read_source_card(text: str, where: str, notes: list[str]) -> SourceCard:
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # noqa: BLE001 - yaml's and ModelCardData's errors alike: the metadata is unusable
        notes.append(f"{where}: its front matter does not parse ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                     "the card carries none of its metadata (license, tags): check them by hand")
        match = REGEX_YAML_BLOCK.search(text)
        return SourceCard(data=None, text=text[match.end():] if match else text)
    return SourceCard(data=card.data, text=card.text)


def _source_readme(folder: Path | None, hub_id: str | None, notes: list[str]) -> SourceCard | None:
    """The source's own card: README.md in its folder, else from the Hub when it can be reached."""
    if folder is not None and (folder / "README.md").is_file():
        return _read_source_card((folder / "README.md").read_text(encoding="utf-8", errors="replace"), f"{folder}/README.md", notes)
    if hub_id is None:
        return None
    from quantkit import hub
    from quantkit.errors import HubOffline

    try:
        hub.ensure_reachable(hub_id)
        path = hub.get_hf_api().hf_hub_download(hub_id, "README.md")
    except HubOffline:
        notes.append(f"the Hub cannot be reached: the card has no license and no source card for {hub_id}")
        return None
    except Exception as exc:  # noqa: BLE001 - a missing source card is not fatal; the reason is said
        notes.append(f"could not read {hub_id}'s README.md ({type(exc).__name__}): the card has no license from it")
        return None
    return _read_source_card(Path(path).read_text(encoding="utf-8", errors="replace"), f"{hub_id}'s README.md", notes)


def _calibration(work: Path | None) -> str:
    """The calibration the measurement was made with, as its provenance records it."""
    prov = read_provenance(work) if work is not None else None
    if prov is None:
        return "not measured yet" if work is None or not (work / MEASUREMENT).is_file() else "not recorded"
    return f"{prov.calibration} ({prov.rows} rows of {prov.length} tokens), manifest sha256 `{prov.calibration_sha256[:12]}`"


def _recipe_branches(work: Path | None) -> list[Branch]:
    """The branches the work folder's settings name, else the default set."""
    defaults = {b.name: b for b in default_branches()}
    recorded = read_settings(work) if work is not None else None
    if recorded is None or not recorded.settings.branches:
        return list(defaults.values())
    return [b if b.description or b.name not in defaults else b.model_copy(update={"description": defaults[b.name].description})
            for b in recorded.settings.branches]


def _converted_plan(work: Path, names: list[str], planned: dict[str, Branch], cache: CacheMode) -> tuple[Plan, dict[str, int]]:
    """One plan over every converted branch, each sized from its own safetensors headers."""
    rows, sizes, descriptions, warnings = [], {}, {}, []
    ram, weights_from, native = 0, "safetensors headers", 0
    for name in names:
        folder = work / "out" / name
        model = load_model(folder)
        qk = read_branch_provenance(folder)
        qc = model.config.get("quantization_config") or {}  # exllamav2's own record, when quantkit.json is absent
        bits = float(qk.bits if qk else qc.get("bits") or planned.get(name, _nobranch()).bits)
        head = int(qk.head_bits if qk else qc.get("head_bits") or planned.get(name, _nobranch()).head_bits)
        br = Branch(name=name, bits=bits, head_bits=head, description=planned[name].description if name in planned else "")
        plan = make_plan(model, [br], list(CONTEXTS), [cache])
        rows += plan.rows
        ram, weights_from, native = plan.embeddings_ram_bytes, plan.weights_from, plan.native_context
        warnings += [w for w in plan.warnings if w not in warnings]
        descriptions[name] = br.description
        sizes[name] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return Plan(model=str(work), rows=rows, embeddings_ram_bytes=ram, weights_from=f"{weights_from} of each branch",
                warnings=warnings, descriptions=descriptions, native_context=native), sizes


def _nobranch() -> Branch:
    return Branch(name="?", bits=8.0, head_bits=8)


def _planned_sizes(plan: Plan) -> dict[str, int]:
    """File size of a planned branch: quantized weights plus the fp16 embedding table it also stores."""
    first = {}
    for r in plan.rows:
        first.setdefault(r.branch, r)
    return {b: r.components["decoder_weights"] + r.components["norms_and_biases"] + r.components["lm_head"] + plan.embeddings_ram_bytes
            for b, r in first.items()}


def card_spec(ref: str | Path, *, repo: str | None = None, override_format: str | None = None, cache: str = "fp16",
              base_model: str | None = None, include_source_card: bool = True, branches: list[str] | None = None) -> CardSpec:
    """Gather the card's facts from a work folder (converted or not) or a model folder / Hub id.

    `base_model` overrides the source's Hub id as the work folder records it (or as `source.identify`
    finds it). `branches` limits a converted card to those branches (the ones published so far).

    Raises:
        WorkFolderIncomplete: a work folder that names no source model and has no conversion.
        the errors of `load_model` for the source model.
    """
    notes: list[str] = []
    mode = CacheMode(cache)
    path = Path(ref).expanduser()
    work = path if is_work_folder(path) else None
    source_ref = source_model(work) if work is not None else str(ref)
    names = converted_branches(work) if work is not None else []
    if branches is not None:
        names = [n for n in names if n in branches]
    if work is not None:  # a branch that failed its evaluation is never published, so never offered
        failed = failed_branches(work)
        names = [n for n in names if n not in failed]
    if work is not None and source_ref is None and not names:
        raise WorkFolderIncomplete(work, "no source model recorded and no converted branch",
                                   "run `quantkit measure MODEL --work WORK` first, or pass the model folder instead")
    recorded_source = read_source(work) if work is not None else None
    folder = _source_folder(recorded_source.path if recorded_source is not None else None) or _source_folder(source_ref)
    ident = recorded_source if recorded_source is not None and recorded_source.hub_id else identify(str(source_ref), folder)
    hub_id = base_model or ident.hub_id
    if hub_id is None:
        notes.append(f"{source_ref} is not a Hub repo id: the card has no base_model (pass --base-model USER/NAME)")
    elif base_model is None and ident.how:
        notes.append(f"base_model {hub_id}: {ident.how} (pass --base-model USER/NAME if that is wrong)")

    tokenizer_dir = folder
    if (tokenizer_dir is None or not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES)) and names:
        tokenizer_dir = work / "out" / names[0]  # type: ignore[operator]
    fmt = prompt_format(tokenizer_dir, override=override_format) if tokenizer_dir is not None else PromptFormat(
        name="unknown", text="", source="none", note="no tokenizer files to read: pass --prompt-format")
    if fmt.note:
        notes.append(f"prompt format: {fmt.note}")

    planned = {b.name: b for b in _recipe_branches(work)}
    adapter: str | None = None
    if names:
        plan, sizes = _converted_plan(work, names, planned, mode)  # type: ignore[arg-type]
    else:
        model: Model = load_model(folder if folder is not None else str(source_ref))
        plan = make_plan(model, list(planned.values()), list(CONTEXTS), [mode])
        sizes = _planned_sizes(plan)
        adapter = model.adapter.summary() if model.adapter is not None else None
    notes += plan.warnings

    src = _source_readme(folder, hub_id, notes)
    data = src.data if src is not None and src.data is not None else ModelCardData()
    prov = read_provenance(work) if work is not None else None
    version = prov.exllamav2_version if prov is not None else EXLLAMAV2_VERSION
    if adapter is None and prov is not None and prov.adapter is not None:
        adapter = prov.adapter.summary
    if adapter is not None:
        notes.append(f"architecture adapter: {adapter}")
    shown_repo = repo or f"USER/{(hub_id or str(source_ref)).rstrip('/').split('/')[-1]}-exl2"
    return CardSpec(
        source=hub_id or (folder.name if folder is not None else str(source_ref)),
        base_model=hub_id,
        repo=shown_repo,
        quantized_by=repo.split("/")[0] if repo else None,
        license=getattr(data, "license", None),
        license_name=getattr(data, "license_name", None),
        license_link=getattr(data, "license_link", None),
        language=getattr(data, "language", None),
        datasets=getattr(data, "datasets", None),
        pipeline_tag=getattr(data, "pipeline_tag", None) or "text-generation",
        source_tags=[str(t) for t in (getattr(data, "tags", None) or []) if t],
        exllamav2_version=version,
        calibration=_calibration(work),
        prompt=fmt,
        plan=plan,
        sizes=sizes,
        cache=mode.value,
        converted=bool(names),
        source_card=(src.text.strip() or None) if (src is not None and include_source_card) else None,
        notes=notes,
        adapter=adapter,
        quality=card_quality(work, shown_repo) if work is not None and names else None,
    )


def front_matter(spec: CardSpec) -> str:
    fields: dict[str, Any] = {
        "base_model": spec.base_model,
        "base_model_relation": "quantized" if spec.base_model else None,
        "license": spec.license,
        "license_name": spec.license_name,
        "license_link": spec.license_link,
        "language": spec.language,
        "datasets": spec.datasets,
        "pipeline_tag": spec.pipeline_tag,
        "tags": list(dict.fromkeys([*QUANTKIT_TAGS, *spec.source_tags])),
        "quantized_by": spec.quantized_by,
    }
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None}).to_yaml()


def _example_branch(spec: CardSpec) -> str:
    branches = list(dict.fromkeys(r.branch for r in spec.plan.rows))
    recommended = [b for b in branches if "recommended" in spec.plan.descriptions.get(b, "").lower()]
    return (recommended or branches)[0]


def render_card(spec: CardSpec) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("quantkit", "templates"), trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True, undefined=StrictUndefined, autoescape=False)
    example = _example_branch(spec)
    text = env.get_template(TEMPLATE).render(
        front_matter=front_matter(spec).strip(),
        source=spec.source,
        original=f"[{spec.base_model}](https://huggingface.co/{spec.base_model})" if spec.base_model else spec.source,
        exllamav2_version=spec.exllamav2_version,
        calibration=spec.calibration,
        prompt_text=spec.prompt.text.rstrip("\n"),
        cache_statement=cache_statement(spec.plan, spec.cache),
        planned=not spec.converted,
        table=markdown_table(spec.plan, spec.cache, sizes=spec.sizes, extra=spec.quality.columns if spec.quality else None),
        quality=spec.quality,
        repo=spec.repo,
        example=example,
        folder=f"{spec.repo.split('/')[-1]}-{example}",
        source_card=spec.source_card,
        adapter=spec.adapter,
    )
    return text


def parse_card(text: str) -> ModelCard:
    """The card as huggingface_hub reads it; raises `CardInvalid` when its front matter does not parse."""
    try:
        return ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # noqa: BLE001 - yaml and ValueError alike mean a broken card
        raise CardInvalid(f"{type(exc).__name__}: {exc}") from exc
