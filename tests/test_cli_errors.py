"""The error table: every typed error the core raises has a row, and each row is checked here with a
constructed instance: one line, and the words that name the problem and its fix."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import pytest

from quantkit import errors as e
from quantkit.cli.errors import ERROR_TABLE, format_error

GiB = 1024**3

# One constructed instance per row, in the stage order of quantkit.errors, with a piece of the message
# that must survive edits: the fix, or the logic the row carries (plurals, units, nested causes).
SAMPLES = [
    # options
    (e.InvalidBits("9", "too high"), "bits 9: too high; pass e.g. --bits"),
    (e.InvalidHeadBits("7"), "use 2, 3, 4, 5, 6 or 8"),
    (e.InvalidContext("4x", "bad"), "context 4x: bad; e.g. --context 4k"),
    (e.UnknownCacheMode("q5", ["fp16", "q4"]), "use one of fp16, q4"),
    (e.InvalidSize("lots"), "write it like 24GiB"),
    (e.UnknownLoader("exllama", ["tabby", "autosplit"]), "unknown loader 'exllama': use one of tabby, autosplit"),
    (e.InvalidHeadroom("much", "does not parse"), "headroom 'much' does not parse; write it like 1GiB"),
    (e.InvalidCount("--rows", 0), "--rows must be a positive whole number, got 0"),
    (e.UnknownPromptFormat("x", ["chatml"]), "--prompt-format"),
    (e.RecipeUnreadable(Path("r.toml"), "no [model]"), "recipe r.toml: no [model]; see `quantkit run --help`"),
    (e.InvalidBranchName("../x", "r.toml"), "branch name '../x' in r.toml is not allowed"),
    (e.DuplicateBranchName("6_5", "r.toml"), "branch name '6_5' is given twice in r.toml: give each branch its own name"),
    (e.RecipeUnknownKey(Path("r.toml"), "head_bit", "[[branch]]", ["name", "bits", "head_bits"]), "recipe r.toml: unknown key 'head_bit' in [[branch]]: fix its spelling"),
    (e.PathOverlapsModel("--work", Path("m/w"), Path("/m")), "--work m/w overlaps the model folder /m, which quantkit never writes"),
    (e.PathOverlapsWork("--to", Path("w/out"), Path("/w")), "--to w/out is the work folder /w or a folder quantkit fills"),
    (e.PathLeavesWork("branch 6_5's job folder", Path("w/jobs/6_5"), Path("/w")), "leads outside the work folder /w"),
    (e.OutputPathInvalid(Path("f/x"), "f is a file, not a folder"), "f/x: f is a file, not a folder: pick another output path"),
    (e.MissingExtra("torch", "rewrite tensors"), "torch is needed to rewrite tensors: pip install torch"),
    # model and architectures
    (e.ModelNotFound("x"), "pass a model folder or an id like user/model"),
    (e.ConfigMissing(Path("m")), "no config.json in m: point MODEL at"),
    (e.ConfigUnreadable(Path("m/config.json"), "not valid JSON"), "m/config.json: not valid JSON; fix or re-download"),
    (e.MissingConfigKey("LlamaForCausalLM", "hidden", ["hidden_size", "d_model"]), "has no hidden (looked for hidden_size, d_model): add it"),
    (e.UnsupportedArchitecture("BertModel", "why"), "architecture BertModel is not supported: why. `quantkit archs`"),
    # A subclass's own row wins over its base's.
    (e.AdapterRefused("GPTNeoXForCausalLM", "rotary_pct", "0.3 of the head"), "cannot map rotary_pct (0.3 of the head)"),
    (e.AdapterCheckpointMismatch("StableLmForCausalLM", "no q_norm"), "does not match its config.json: no q_norm; re-download"),
    (e.AdapterTargetInvalid(Path("m"), Path("m/w"), "inside the model"), "m/w: inside the model; pick a new, empty folder outside the model folder m"),
    (e.HubOffline("a/b"), "download the model's config.json into a folder"),
    (e.HubRepoNotFound("a/b"), "a/b: not found on the Hub; check the repo id"),
    (e.InvalidModelShape("LlamaForCausalLM", "layers", 0, "must be at least 1"), "config.json: layers = 0 must be at least 1; fix that field"),
    (e.HubRevisionNotFound("a/b", "9bpw", ["6_5", "main"]), "a/b has no branch '9bpw' (branches: 6_5, main): pick one, e.g. a/b:6_5"),
    (e.HubRevisionNotFound("a/b", "9bpw", []), "a/b has no branch '9bpw': pick one, e.g. a/b:main"),
    (e.NotExl2Branch("a/b", "main", "it holds no config.json"), "a/b:main is not a converted EXL2 branch (it holds no config.json)"),
    (e.CorruptSafetensors("s.safetensors", "bad header"), "re-download or re-convert"),
    (e.NoWeights(Path("m")), "no weights in m (looked for *.safetensors and pytorch_model*.bin): download"),
    (e.TokenizerMissing(Path("m"), "tokenizer.json"), "m has no tokenizer.json: exllamav2 0.3.2 needs"),
    # calibration
    (e.UnknownCalibration("wiki", ["default"]), "no calibration recipe or file named 'wiki': use one of default"),
    (e.CalibrationSourceMissing("x.parquet"), "calibration source x.parquet not found"),
    (e.CalibrationUnreadable("x.bin", "not Parquet"), "x.bin: not Parquet; pass Parquet, JSONL"),
    (e.NoTextColumn("x.jsonl", "text", []), "no column 'text' (columns: none): pass --text-column"),
    (e.NotEnoughText("x.txt", 100, 4, 64), "holds 100 tokens, fewer than rows x length = 4 x 64 = 256"),
    # converter
    (e.ConverterMissing("no exllamav2"), "no exllamav2: install the converter"),
    (e.NoCudaDevice("torch.cuda.is_available() is False"), "runs only on an NVIDIA GPU"),
    (e.ConverterFailed("measure", "layer 3", "exited", 1, "CUDA OOM", Path("w/log")),
     "measure failed at layer 3: exited (CUDA OOM), exit status 1; the work is kept: fix the cause (log: w/log)"),
    (e.ConverterFailed("convert", "start", "killed", None, "", Path("l")), "convert failed at start: killed, exit status None;"),
    (e.ConverterCancelled("convert 6.5", "layer 2", Path("l")), "convert 6.5 cancelled at layer 2; the work is kept"),
    (e.JobMismatch(Path("w"), "bits", 4.0, 6.5), "w holds a converter job with bits=4.0, not 6.5: use another --work"),
    (e.MeasurementCorrupt(Path("w/measurement.json"), "not JSON"), "not JSON; run `quantkit measure` again"),
    (e.MeasurementMismatch(Path("m.json"), "rows", 100, 200), "its rows is 100, here 200; measure this model"),
    (e.UnreachableBits(9.0, 2.1, 8.04), "9 bpw cannot be reached with this measurement: it reaches 2.100 to 8.040 bpw"),
    (e.NoSuchGpu("5", ["0", "1"]), "--gpus names GPU 5, which this machine does not show (visible: 0, 1): pass ids from `nvidia-smi -L`"),
    (e.NoSuchGpu("all", []), "(visible: none)"),
    (e.ClusterUnreachable("ray://h:10001", "connection refused"), "the Ray cluster at ray://h:10001 does not answer (connection refused): start it"),
    # work folder
    (e.WorkFolderMismatch(Path("w"), "a/b", "c/d"), "w holds work for a/b, not c/d: use another --work"),
    (e.WorkFolderBusy(Path("w"), 4242, "quantkit run r.toml"), "w is in use by PID 4242 (quantkit run r.toml): wait for it"),
    (e.WorkFolderNotWritable(Path("w/state.json"), "cannot write it (Permission denied)"), "make the work folder writable"),
    (e.WorkFolderIncompatible(Path("w/state.json"), 2, 1), "w/state.json is in work-folder format 2, but this quantkit reads format 1: use a new --work"),
    (e.WorkFolderCorrupt(Path("w/recipe.json"), "settings: Field required"), "w/recipe.json is not a file quantkit wrote (settings: Field required): restore it"),
    (e.WorkFolderIncomplete(Path("w"), "no measurement.json", "run `quantkit measure` first"), "w: no measurement.json; run `quantkit measure`"),
    (e.MeasurementMissing(Path("w")), "run `quantkit measure MODEL --work w` first"),
    (e.SettingsLocked("rows", 100, 200), "rows changed from 100 to 200, which would invalidate finished work"),
    (e.DiskTooSmall(Path("w"), 10 * GiB, GiB // 2), "w has 0.5 GiB free but the plan needs 10.0 GiB: free space"),
    (e.ClusterTasksFailed({"tiny:convert:8": e.NoWeights(Path("/m"), "*.safetensors")}),
     "1 cluster task(s) failed, the others finished: tiny:convert:8: no weights in /m"),
    # evaluation
    (e.EvalTextTooShort("short.txt", 10, 4, 64), "fewer than rows x length = 4 x 64 = 256: pass a longer --source"),
    (e.EvalOverlapsCalibration("cal.txt", 0.9, Path("w/calibration/calibration.parquet")), "90% of the evaluation text cal.txt is also in the calibration set"),
    (e.NotAnExl2Branch(Path("w/out/x"), "no config.json"), "w/out/x is not a converted EXL2 model (no config.json): name a branch folder"),
    (e.EvalReferenceFailed("tiny", "boom"), "(tiny: boom); nothing was evaluated: fix the cause and rerun `quantkit eval WORK`"),
    # publish
    (e.InvalidRepoId("a b", "bad"), "USER/NAME, e.g. --repo alice/"),
    (e.InvalidRepoId("a", "it must be exactly USER/NAME", "--base-model"), "e.g. --base-model meta-llama/"),
    (e.InvalidBranchName("6 5"), "letters, digits"),
    (e.CardInvalid("bad yaml"), "the model card does not validate: bad yaml; fix"),
    (e.NoHubToken("a/b"), "no Hugging Face token to publish a/b: log in with `hf auth login` (or set HF_TOKEN), or publish into a local git repository with --to PATH"),
    (e.BaseModelUnknown("my-model"), "my-model is not a Hub id, so the card would have no base_model"),
    (e.BaseModelUnknown("my-model"), "pass --base-model USER/NAME (or --no-base-model to publish without it)"),
    (e.LocalTargetNotRepo(Path("r"), "notes.txt"), "r is not empty and not a git repository (it holds notes.txt): pick a new or empty folder"),
    (e.TokenCannotWrite("org", "bob", "read-only"), "write token"),
    (e.HubRequestFailed("create_commit", 403, "forbidden"), "create_commit failed on the Hub (HTTP 403): forbidden; rerun"),
    (e.HubRequestFailed("upload", None, "timeout", 3), "(HTTP no response, after 3 attempts): timeout"),
    (e.PrivateStorageExceeded(200 * 10**9, 100 * 10**9, "free"), "needs 200.0 GB but free private storage is 100 GB: publish without --private"),
    (e.ForeignFiles("hub:a/b", "6_5", ["NOTES.md"]), "holds files quantkit did not write: NOTES.md; publish to another repo, or pass --force"),
    (e.BranchVerifyFailed("hub:a/b", "main", ["README.md"], []), "(missing: README.md; unexpected: none); rerun"),
    (e.GitFailed(["commit-tree", "-p", "abc", "def"], "boom"), "git commit-tree -p abc failed: boom; check the local target"),
    (e.LocalTargetDirty(Path("r"), ["README.md"]), "commit or stash"),
    (e.PublishFailed("6_5", "hub:a/b", e.NoHubToken("a/b")),
     "branch 6_5 was converted but not published to hub:a/b: no Hugging Face token to publish a/b: log in with `hf auth login`"),
]


@pytest.mark.parametrize(("exc", "text"), SAMPLES, ids=[f"{type(x).__name__}-{i}" for i, (x, _) in enumerate(SAMPLES)])
def test_message(exc: e.QuantkitError, text: str) -> None:
    msg = format_error(exc)
    assert text in msg and "\n" not in msg


def _errors() -> set[type[e.QuantkitError]]:
    return {c for _, c in inspect.getmembers(e, inspect.isclass) if issubclass(c, e.QuantkitError)}


# The stage bases (direct children of QuantkitError) only group others and are never raised themselves.
STAGES = {c for c in _errors() if c.__bases__ == (e.QuantkitError,)}


def test_every_error_belongs_to_a_stage() -> None:
    assert STAGES == {e.OptionError, e.ModelError, e.CalibrationError, e.ConverterError, e.WorkFolderError, e.EvalError, e.PublishError}
    assert all(issubclass(c, tuple(STAGES)) for c in _errors() - {e.QuantkitError})


def test_every_error_class_has_a_row_and_every_row_a_sample() -> None:
    concrete = _errors() - STAGES - {e.QuantkitError}
    assert sorted(c.__name__ for c in concrete - set(ERROR_TABLE)) == []
    assert sorted(c.__name__ for c in set(ERROR_TABLE) - {type(x) for x, _ in SAMPLES}) == []


@pytest.mark.parametrize("exc", [x for x, _ in SAMPLES], ids=[f"{type(x).__name__}-{i}" for i, (x, _) in enumerate(SAMPLES)])
def test_errors_survive_pickling_with_their_fields(exc: e.QuantkitError) -> None:
    # Errors cross process boundaries (the run's workers); a dataclass __init__ breaks Exception's default.
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and "\n" not in str(exc)


def test_unexpected_errors_still_one_line() -> None:
    assert "QUANTKIT_DEBUG=1" in format_error(KeyError("x"))
