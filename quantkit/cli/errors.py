"""The one edge where quantkit's typed errors become a one-line message with a remedy.

Every `QuantkitError` subclass the core raises has a row here; `tests/test_cli_errors.py` checks each.
Set QUANTKIT_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from quantkit import errors as e

DEBUG_ENV = "QUANTKIT_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in {"", "0", "false", "no"}


E = TypeVar("E", bound=e.QuantkitError)
_Message = Callable[[Any], str]


def row(cls: type[E], message: Callable[[E], str]) -> tuple[type[e.QuantkitError], _Message]:
    """One row of the table; the type checker holds `message` to the attributes of `cls`."""
    return cls, message


# In the order of quantkit.errors: options, model and architectures, calibration, converter, work folder,
# publish. A subclass's row wins over its base's (format_error walks the MRO).
ERROR_TABLE: dict[type[e.QuantkitError], _Message] = dict([
    # options: values given on the command line or in a recipe
    row(e.InvalidBits, lambda x: f"bits {x.value}: {x.reason}; pass e.g. --bits 8.0,6.5,5.0"),
    row(e.InvalidHeadBits, lambda x: f"head bits {x.value} is not an lm_head option of exllamav2: use 2, 3, 4, 5, 6 or 8 (e.g. --head-bits 8)"),
    row(e.InvalidContext, lambda x: f"context {x.value}: {x.reason}; e.g. --context 4k,8k,16k,32k"),
    row(e.UnknownCacheMode, lambda x: f"unknown cache mode {x.value!r}: use one of {', '.join(x.known)} (e.g. --cache fp16,q4)"),
    row(e.InvalidSize, lambda x: f"GPU size {x.value!r} does not parse: write it like 24GiB, 24GB or 16384MiB"),
    row(e.UnknownLoader, lambda x: f"unknown loader {x.value!r}: use one of {', '.join(x.known)} (e.g. --loader tabby)"),
    row(e.InvalidHeadroom, lambda x: f"headroom {x.value!r} {x.reason}; write it like 1GiB or 512MiB, smaller than --gpu (e.g. --headroom 1GiB)"),
    row(e.InvalidCount, lambda x: f"{x.name} must be a positive whole number, got {x.value!r}"),
    row(e.UnknownPromptFormat, lambda x: f"prompt format {x.value!r} is neither a known name nor a format containing {{prompt}}: use one of {', '.join(x.known)}, or e.g. --prompt-format '### User:\\n{{prompt}}\\n### Assistant:\\n'"),
    row(e.RecipeUnreadable, lambda x: f"recipe {x.path}: {x.reason}; see `quantkit run --help` for the format"),
    row(e.MissingExtra, lambda x: f"{x.package} is needed to {x.purpose}: pip install {x.package}"),
    row(e.NoSuchGpu, lambda x: f"--gpus names GPU {x.gpu}, which this machine does not show (visible: {', '.join(x.visible) or 'none'}): "
                               "pass ids from `nvidia-smi -L` (or from CUDA_VISIBLE_DEVICES when it is set), e.g. --gpus 0,1"),
    row(e.ClusterUnreachable, lambda x: f"the Ray cluster at {x.address} does not answer ({x.reason}): start it (`ray start --head`) "
                                        "or pass its address, e.g. --cluster ray://HEAD:10001"),
    row(e.InvalidBranchName, lambda x: f"branch name {x.name!r}" + (f" in {x.source}" if x.source else "") + " is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit, without '..' (like 6_5 or 6.5bpw)"),
    row(e.DuplicateBranchName, lambda x: f"branch name {x.name!r} is given twice" + (f" in {x.source}" if x.source else "") + ": give each branch its own name (two bitrates would share one folder and one Hub branch)"),
    row(e.RecipeUnknownKey, lambda x: f"recipe {x.path}: unknown key {x.key!r} in {x.table}: fix its spelling or remove it (known: {', '.join(x.known)})"),
    row(e.PathOverlapsModel, lambda x: f"{x.what} {x.path} overlaps the model folder {x.model_dir}, which quantkit never writes: pick a folder outside it"),
    row(e.PathOverlapsWork, lambda x: f"{x.what} {x.path} is the work folder {x.work} or a folder quantkit fills inside it: pick a folder of its own, outside the work folder"),
    row(e.PathLeavesWork, lambda x: f"{x.what} {x.path} leads outside the work folder {x.work} (a symlink on the way?): remove the link or pick another --work"),
    row(e.OutputPathInvalid, lambda x: f"{x.path}: {x.reason}: pick another output path"),
    # model and architectures: config.json, safetensors, the Hub, the adapters
    row(e.ModelNotFound, lambda x: f"{x.ref}: no such folder and not a Hub repo id: pass a model folder or an id like user/model"),
    row(e.ConfigMissing, lambda x: f"no config.json in {x.path}: point MODEL at a Hugging Face model folder (one holding config.json) or a Hub repo id"),
    row(e.ConfigUnreadable, lambda x: f"{x.path}: {x.reason}; fix or re-download that file"),
    row(e.MissingConfigKey, lambda x: f"{x.arch} config.json has no {x.field} (looked for {', '.join(x.aliases)}): add it to config.json"),
    row(e.UnsupportedArchitecture, lambda x: f"architecture {x.arch} is not supported: {x.reason}. `quantkit archs` lists what is"),
    row(e.AdapterRefused, lambda x: f"{x.arch}: quantkit's adapter cannot map {x.feature} ({x.detail}); exllamav2 has no exact equivalent, so this model cannot be quantized with it. `quantkit archs` lists what maps"),
    row(e.AdapterCheckpointMismatch, lambda x: f"{x.arch} checkpoint does not match its config.json: {x.reason}; re-download the model or fix config.json"),
    row(e.AdapterTargetInvalid, lambda x: f"{x.dst}: {x.reason}; pick a new, empty folder outside the model folder {x.src}"),
    row(e.HubOffline, lambda x: f"{x.repo_id}: the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE is set): download the model's config.json into a folder and pass that folder"),
    row(e.HubRepoNotFound, lambda x: f"{x.repo_id}: not found on the Hub {x.detail}".rstrip() + "; check the repo id, or log in with `hf auth login` for a private repo"),
    row(e.InvalidModelShape, lambda x: f"{x.arch} config.json: {x.field} = {x.value!r} {x.reason}; fix that field in config.json (it describes no real model)"),
    row(e.HubRevisionNotFound, lambda x: f"{x.repo_id} has no branch {x.revision!r}" + (f" (branches: {', '.join(x.known)})" if x.known else "") + f": pick one, e.g. {x.repo_id}:{(x.known or ['main'])[0]}"),
    row(e.NotExl2Branch, lambda x: f"{x.repo_id}:{x.revision} is not a converted EXL2 branch ({x.reason}): name a branch that holds one (they are usually named by bitrate, like 6_5 or 6.0bpw)"),
    row(e.CorruptSafetensors, lambda x: f"{x.path}: {x.reason}: the shard is truncated or not safetensors; re-download or re-convert it"),
    row(e.NoWeights, lambda x: f"no weights in {x.path} (looked for {x.looked_for}): download the model's weight files into that folder"),
    row(e.TokenizerMissing, lambda x: f"{x.folder} has no {x.what}: exllamav2 0.3.2 needs the model's tokenizer.json; add it to the model folder"),
    # calibration sets
    row(e.UnknownCalibration, lambda x: f"no calibration recipe or file named {x.name!r}: use one of {', '.join(x.known)} or a file path (`quantkit calibration show NAME`)"),
    row(e.CalibrationSourceMissing, lambda x: f"calibration source {x.source} not found: pass an existing Parquet/JSONL/CSV/text file, a dataset folder, or a Hub dataset id (online)"),
    row(e.CalibrationUnreadable, lambda x: f"calibration source {x.source}: {x.reason}; pass Parquet, JSONL, CSV or plain text (or --format to say which)"),
    row(e.NoTextColumn, lambda x: f"calibration source {x.source} has no column {x.wanted!r} (columns: {', '.join(x.columns) or 'none'}): pass --text-column NAME or --messages-column NAME"),
    row(e.NotEnoughText, lambda x: f"calibration source {x.source} holds {x.tokens} tokens, fewer than rows x length = {x.rows} x {x.length} = {x.rows * x.length}: add text, or lower --rows/--length"),
    # the converter: exllamav2's measure and convert
    row(e.ConverterMissing, lambda x: f"{x.detail}: install the converter with `pip install exllamav2==0.3.2` on a machine with an NVIDIA GPU and a CUDA build of torch (or set QUANTKIT_CONVERTER)"),
    row(e.NoCudaDevice, lambda x: f"no CUDA device ({x.detail}): exllamav2's converter runs only on an NVIDIA GPU; run this on a GPU machine"),
    row(e.ConverterFailed, lambda x: f"{x.task} failed at {x.stage}: {x.reason}" + (f" ({x.last_error})" if x.last_error else "") + f", exit status {x.exit_code}; the work is kept: fix the cause (log: {x.log}) and rerun the same command to resume"),
    row(e.ConverterCancelled, lambda x: f"{x.task} cancelled at {x.stage}; the work is kept (log: {x.log}): rerun the same command to resume"),
    row(e.JobMismatch, lambda x: f"{x.folder} holds a converter job with {x.field}={x.found!r}, not {x.wanted!r}: use another --work folder, or pass --force-settings to start that step over"),
    row(e.MeasurementCorrupt, lambda x: f"{x.path}: {x.reason}; run `quantkit measure` again"),
    row(e.MeasurementMismatch, lambda x: f"{x.path} does not match: its {x.field} is {x.recorded}, here {x.current}; measure this model with `quantkit measure MODEL --work DIR` (another --work folder keeps the old one)"),
    row(e.UnreachableBits, lambda x: f"{x.bits:g} bpw cannot be reached with this measurement: it reaches {x.low:.3f} to {x.high:.3f} bpw on this model; pick --bits inside that range"),
    # the work folder: the run's file-backed state
    row(e.WorkFolderMismatch, lambda x: f"{x.work} holds work for {x.recorded}, not {x.model}: use another --work folder for this model"),
    row(e.WorkFolderBusy, lambda x: f"{x.work} is in use by PID {x.pid if x.pid is not None else '(unknown)'} ({x.command or 'another quantkit'}): wait for it to finish, or stop it, then rerun"),
    row(e.WorkFolderNotWritable, lambda x: f"{x.path}: {x.reason}: make the work folder writable (chmod u+w) or pick another --work"),
    row(e.WorkFolderIncompatible, lambda x: f"{x.path} is in work-folder format {x.found}, but this quantkit reads format {x.supported}: use a new --work folder, or the quantkit version that made this one"),
    row(e.WorkFolderCorrupt, lambda x: f"{x.path} is not a file quantkit wrote ({x.reason}): restore it, or use a new --work folder"),
    row(e.WorkFolderIncomplete, lambda x: f"{x.work}: {x.missing}; {x.remedy}"),
    row(e.MeasurementMissing, lambda x: f"no finished measurement in {x.work}: run `quantkit measure MODEL --work {x.work}` first"),
    row(e.SettingsLocked, lambda x: f"{x.field} changed from {x.recorded!r} to {x.new!r}, which would invalidate finished work: restore it, or pass --force-settings to redo the affected steps"),
    row(e.DiskTooSmall, lambda x: f"{x.path} has {x.free / 1024**3:.1f} GiB free but the plan needs {x.needed / 1024**3:.1f} GiB: free space or pick another --work folder"),
    # evaluation: each branch against the unquantized model
    row(e.EvalTextTooShort, lambda x: f"evaluation text {x.source} holds {x.tokens} tokens, fewer than rows x length = {x.rows} x {x.length} = {x.rows * x.length}: pass a longer --source, or lower --rows/--length"),
    row(e.EvalOverlapsCalibration, lambda x: f"{x.share:.0%} of the evaluation text {x.source} is also in the calibration set {x.calibration}, so the figures would flatter the quants: evaluate on other text (--source), or pass --allow-overlap to go on with a warning"),
    row(e.NotAnExl2Branch, lambda x: f"{x.folder} is not a converted EXL2 model ({x.reason}): name a branch folder that `quantkit convert` wrote (WORK/out/<branch>)"),
    row(e.EvalReferenceFailed, lambda x: f"the unquantized model's reference logits could not be computed ({x.model}: {x.reason}); nothing was evaluated: fix the cause and rerun `quantkit eval WORK`, finished parts are kept"),
    # publish: the card, the Hub and local git targets
    row(e.InvalidRepoId, lambda x: f"repo id {x.repo_id!r} is not valid ({x.reason}): write it as USER/NAME, e.g. {x.option} " + ("alice/Llama-3-8B-exl2" if x.option == "--repo" else "meta-llama/Meta-Llama-3-8B")),
    row(e.CardInvalid, lambda x: f"the model card does not validate: {x.reason}; fix the source's metadata (license, base_model) or report it"),
    row(e.NoHubToken, lambda x: f"no Hugging Face token to publish {x.repo or 'to the Hub'}: log in with `hf auth login` (or set HF_TOKEN), or publish into a local git repository with --to PATH"),
    row(e.BaseModelUnknown, lambda x: f"{x.source} is not a Hub id, so the card would have no base_model and the quants would not appear in the source's model tree: pass --base-model USER/NAME (or --no-base-model to publish without it)"),
    row(e.LocalTargetNotRepo, lambda x: f"{x.path} is not empty and not a git repository (it holds {x.found}): pick a new or empty folder, or a git repository, for --to"),
    row(e.TokenCannotWrite, lambda x: f"the token of {x.user} cannot write to {x.namespace} ({x.reason}): create a write token at https://huggingface.co/settings/tokens, or publish under your own name"),
    row(e.HubRequestFailed, lambda x: f"{x.action} failed on the Hub (HTTP {x.status or 'no response'}" + (f", after {x.attempts} attempts" if x.attempts > 1 else "") + f"): {x.reason}; rerun `quantkit publish`, it finishes only what is missing"),
    row(e.PrivateStorageExceeded, lambda x: f"the upload needs {x.needed / 1e9:.1f} GB but {x.plan} private storage is {x.quota / 1e9:.0f} GB: publish without --private, or free private storage"),
    row(e.ForeignFiles, lambda x: f"{x.target} branch {x.branch} holds files quantkit did not write: {', '.join(x.files)}; publish to another repo, or pass --force to overwrite them"),
    row(e.BranchVerifyFailed, lambda x: f"{x.target} branch {x.branch} does not hold what was committed (missing: {', '.join(x.missing) or 'none'}; unexpected: {', '.join(x.unexpected) or 'none'}); rerun `quantkit publish` to finish it"),
    row(e.GitFailed, lambda x: f"git {' '.join(x.args_[:3])} failed: {x.reason}; check the local target repository"),
    row(e.LocalTargetDirty, lambda x: f"{x.path} has uncommitted changes ({', '.join(x.files[:5])}): commit or stash them, or pick another --to folder"),
    row(e.ClusterTasksFailed, lambda x: f"{len(x.failures)} cluster task(s) failed, the others finished: "
                                        + "; ".join(f"{k}: {format_error(v).splitlines()[0]}" for k, v in x.failures.items())
                                        + " (rerun the same command: it redoes only what is missing)"),
    row(e.PublishFailed, lambda x: f"branch {x.branch} was converted but not published to {x.target}: {format_error(x.cause)} "
                                        "(rerun `quantkit run RECIPE`: it publishes only what is missing)"),
])


def format_error(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls](exc)
    if isinstance(exc, e.QuantkitError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback, and please report it)"
