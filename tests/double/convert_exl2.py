"""A CPU test double for `python -m exllamav2.conversion.convert_exl2` (exllamav2 0.3.2). Tests only.

Same arguments, same job_new.json progress order and resume rules, same `[STATUS]` lines, a
measurement.json in exllamav2's format (19 attention / 17 MLP options per layer, `total_bits` from the
real qparams maths on the model's shapes), EXL2-named output shards sized by the chosen bits, and the
same copy of non-tensor files (stale index and README included). Accuracies are made up.

Failure injection (environment):
  QK_DOUBLE_FAIL_AT     a progress name ("begin", "measure_quant", "quant", "compile", ...) or
                        "measure_quant:N" / "quant:N" (after N modules of that stage)
  QK_DOUBLE_FAIL_MODE   "exit1" (` ## ` line, os._exit(1)), "exit0" (` ## ` line, sys.exit()),
                        "hang" (sleep until killed), "kill" (SIGKILL itself, like the OOM killer),
                        "kill-parent" (SIGKILL the process that started it, then itself: a Ray worker or
                        node dying mid-conversion)
  QK_DOUBLE_FAIL_ONCE   a marker file: the failure fires only while it does not exist, and creates it
  QK_DOUBLE_DELAY       seconds to sleep per module (for overhead benchmarks)
  QK_DOUBLE_JOB_SECONDS seconds one whole job takes, spread over its modules (a measurement and each
                        conversion the same; for the parallel-branches tests and benchmark)
  QK_DOUBLE_BARRIER     "DIR:N": a conversion (-cf) waits before quantizing until N conversions have reached
                        that point (each leaves a file in DIR), printing "barrier passed", or after
                        60 s "barrier timed out": proves that N converters were alive at once
  QK_DOUBLE_ENV_FILE    a JSON object of the variables above, read at start, over the environment:
                        lets a test change them for converters started by long-lived workers (Ray)

Every run prints ` -- (double) start <unix time> CUDA_VISIBLE_DEVICES=<value>` first and
` -- (double) end <unix time>` last, so tests can show which GPU a job saw and which jobs overlapped.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exl2_qparams import QParams, get_qparams_reduced, qparams_attn, qparams_headoptions, qparams_mlp  # noqa: E402

VERSION = "0.3.2"

parser = argparse.ArgumentParser(description="Convert model to ExLlamaV2 (test double)")
parser.add_argument("-i", "--in_dir", type=str, default="")
parser.add_argument("-o", "--out_dir", type=str)
parser.add_argument("-res", "--resume", action="store_true")
parser.add_argument("-nr", "--no_resume", action="store_true")
parser.add_argument("-cf", "--compile_full", type=str)
parser.add_argument("-c", "--cal_dataset", type=str)
parser.add_argument("-b", "--bits", type=float, default=4.125)
parser.add_argument("-ss", "--shard_size", type=float, default=8192)
parser.add_argument("-rs", "--rope_scale", type=float)
parser.add_argument("-ra", "--rope_alpha", type=float)
parser.add_argument("-hb", "--head_bits", type=int, default=6)
parser.add_argument("-om", "--output_measurement", type=str)
parser.add_argument("-m", "--measurement", type=str)
parser.add_argument("-r", "--dataset_rows", type=int, default=100)
parser.add_argument("-mr", "--measurement_rows", type=int, default=16)
parser.add_argument("-l", "--length", type=int, default=2048)
parser.add_argument("-ml", "--measurement_length", type=int, default=2048)
parser.add_argument("-so", "--status_output", action="store_true")
parser.add_argument("-hsol", "--hidden_state_offload_layers", type=int, default=0)
parser.add_argument("-fst", "--fast_safetensors", action="store_true")
args = parser.parse_args()

ENV = dict(os.environ)
if ENV.get("QK_DOUBLE_ENV_FILE") and os.path.isfile(ENV["QK_DOUBLE_ENV_FILE"]):
    with open(ENV["QK_DOUBLE_ENV_FILE"], encoding="utf8") as _f:
        ENV.update({k: str(v) for k, v in json.load(_f).items()})
FAIL_AT = ENV.get("QK_DOUBLE_FAIL_AT", "")
FAIL_MODE = ENV.get("QK_DOUBLE_FAIL_MODE", "exit1")
FAIL_ONCE = ENV.get("QK_DOUBLE_FAIL_ONCE", "")
DELAY = float(ENV.get("QK_DOUBLE_DELAY", "0") or 0)
JOB_SECONDS = float(ENV.get("QK_DOUBLE_JOB_SECONDS", "0") or 0)
print(f" -- (double) start {time.time():.3f} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)


def pause(modules: int) -> None:
    """One module's share of the job's time."""
    time.sleep(DELAY + JOB_SECONDS / max(1, modules))


def fail_here(point: str) -> None:
    if FAIL_AT != point:
        return
    if FAIL_ONCE:
        if os.path.exists(FAIL_ONCE):
            return
        open(FAIL_ONCE, "w").close()
    if FAIL_MODE == "kill-parent":
        print(f" -- (double) killing its parent {os.getppid()}", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if FAIL_MODE == "hang":
        print(" -- (double) hanging", flush=True)
        while True:
            time.sleep(3600)
    if FAIL_MODE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(f" ## Measurement/inference error (1) (double, at {point})")
    if FAIL_MODE == "exit0":
        sys.exit()
    os._exit(1)


def print_stage(stage: str, progress: int, max_progress: int) -> None:
    if job["status_output"]:
        print("[STATUS]" + json.dumps({"stage": stage, "completion": round(progress / max_progress, 4)}) + "[/STATUS]")


# ---- argument checks, exactly as convert_exl2.py (bare sys.exit() is exit status 0) -------------------

resuming = False
if args.out_dir:
    if not args.no_resume and os.path.exists(os.path.join(args.out_dir, "job_new.json")):
        resuming = True
else:
    print(" ## Please specify output/working directory (-o, --out_dir)")
    sys.exit()
if not args.in_dir and not resuming:
    print(" ## Please specify input model directory (-i, --in_dir)")
    sys.exit()
if args.head_bits not in qparams_headoptions:
    print(f" ## Error: {args.head_bits} is not a supported option for head layer bitrate")
    sys.exit()
if args.output_measurement is not None and args.compile_full is not None:
    print(" ## Conflicting options: --output_measurement and --compile_full")
    sys.exit()
os.makedirs(args.out_dir, exist_ok=True)

job_file = os.path.join(args.out_dir, "job_new.json")


def save_job() -> None:
    with open(job_file, "w", encoding="utf8") as f:
        f.write(json.dumps(job, indent=4))


if args.no_resume or not os.path.exists(job_file):
    print(" -- Beginning new job")
    if args.no_resume:
        for name in os.listdir(args.out_dir):
            p = os.path.join(args.out_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

output_measurement = args.output_measurement
if output_measurement is not None and os.path.isdir(output_measurement):
    output_measurement = os.path.join(output_measurement, "measurement.json")

job = {"in_dir": args.in_dir, "out_dir": args.out_dir, "cal_dataset": args.cal_dataset, "bits": args.bits,
       "dataset_rows": args.dataset_rows, "measurement_rows": args.measurement_rows, "length": args.length,
       "measurement_length": args.measurement_length, "head_bits": args.head_bits,
       "shard_size": args.shard_size if args.shard_size > 0 else 1024 ** 3, "compile_full": args.compile_full,
       "rope_scale": args.rope_scale, "rope_alpha": args.rope_alpha, "output_measurement": output_measurement,
       "progress": "begin"}

if args.measurement is not None:
    with open(args.measurement, "r", encoding="utf8") as f:
        imp = json.load(f)
        job["measurement"] = imp["measurement"]  # KeyError traceback on a bad file, like the real one
        job["last_module_idx"] = imp["last_module_idx"]
        job["reuse_measurement"] = args.measurement

if not (args.no_resume or not os.path.exists(job_file)):
    print(" -- Resuming job")
    with open(job_file, "r", encoding="utf8") as f:
        resume_job = json.load(f)
    del resume_job["out_dir"]
    job.update(resume_job)
    if "invalid" in job:
        print(" ** Error: Corrupted job")
        sys.exit()
    if job["progress"] == "finished":
        print(" !! Job is already finished. Clear the working directory, or run this script with -nr/--no_resume to clear it automatically.")
        sys.exit()

job["status_output"] = args.status_output

# ---- the model, read the way the double needs it ------------------------------------------------------

in_dir = job["in_dir"]
with open(os.path.join(in_dir, "config.json"), encoding="utf8") as f:
    config = json.load(f)
shapes: dict[str, tuple[list[int], str, str]] = {}
for fn in sorted(glob.glob(os.path.join(in_dir, "*.safetensors"))):
    with safe_open(fn, framework="np") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shapes[k] = (sl.get_shape(), sl.get_dtype(), fn)
if not shapes:
    raise ValueError(f" ## No .safetensors files found in {in_dir}")
if not os.path.exists(os.path.join(in_dir, "tokenizer.json")):
    raise ValueError(" ## Model does not include a tokenizer.json file. SentencePiece-only tokenizers are no longer supported")

layers = int(config["num_hidden_layers"])
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# exllamav2's MLP projections (the keys of a measurement option) and, per architecture, the tensor each
# reads: Starcoder2 (what quantkit's GPT-NeoX adapter targets) has no gate and names up/down c_fc/c_proj.
GATED = config["architectures"][0] != "Starcoder2ForCausalLM"
MLP = ["gate_proj", "up_proj", "down_proj"] if GATED else ["up_proj", "down_proj"]
TENSOR = {p: p for p in ATTN + MLP} | ({} if GATED else {"up_proj": "c_fc", "down_proj": "c_proj"})
# exllamav2's module list for Llama: embedding, (attention, MLP) per layer, final norm, lm_head.
modules = ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(layers) for m in ("self_attn", "mlp")] + ["model.norm", "lm_head"]


def linear_shape(key: str) -> tuple[int, int]:
    """(rows, columns) as QParams.total_bits sees them: weight.T, i.e. (in_features, out_features)."""
    group, _, proj = key.rpartition(".")
    key = f"{group}.{TENSOR.get(proj, proj)}" if group else key
    out_f, in_f = shapes[key + ".weight"][0]
    return in_f, out_f


def tokenize(measure: bool) -> None:
    stage = "Tokenizing (1)" if measure else "Tokenizing (2)"
    print_stage(stage, 0, 1)
    rows = job["measurement_rows"] if measure else job["dataset_rows"]
    length = job["measurement_length"] if measure else job["length"]
    if job["cal_dataset"] is not None:
        import pyarrow.parquet as pq
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(in_dir, "tokenizer.json"))
        table = pq.read_table(job["cal_dataset"]).to_pylist()
        ids: list[int] = []
        for r in table:  # tokenize.py joins *all* columns of a row with spaces
            ids += tok.encode(" ".join(str(v) for v in r.values()), add_special_tokens=False).ids
            if len(ids) >= rows * length:
                break
        if len(ids) < rows * length:
            print(f" ** Warning: Not enough sample data in {job['cal_dataset']}")
            raise RuntimeError(f"shape '[{rows}, {length}]' is invalid for input of size {len(ids)}")
        cal = np.array(ids[: rows * length], dtype=np.int64).reshape(rows, length)
    else:
        cal = np.zeros((rows, min(length, 2048)), dtype=np.int64)
    save_file({"input_ids": cal}, os.path.join(job["out_dir"], "cal_data.safetensors"))
    job["cal_filename"] = os.path.join(job["out_dir"], "cal_data.safetensors")
    print_stage(stage, 1, 1)


def measure_module(index: int) -> list[dict]:
    key = modules[index]
    layer = int(key.split(".")[2])
    attn = key.endswith("self_attn")
    projs = ATTN if attn else MLP
    grp = "self_attn" if attn else "mlp"
    # measure.py measure_mlp: get_qparams_reduced(qparams_mlp, not has_gate) drops the gate column.
    qjobs, qmaps = get_qparams_reduced(qparams_attn if attn else qparams_mlp, not attn and not GATED)
    cols = list(range(len(projs))) if attn or GATED else [1, 2]
    numel = sum(a * b for a, b in (linear_shape(f"{key}.{p}") for p in projs))
    results = []
    for m in qmaps:
        qps = [qjobs[c][m[j]] for j, c in enumerate(cols)]
        total = sum(qp.total_bits(linear_shape(f"model.layers.{layer}.{grp}.{p}")) for p, qp in zip(projs, qps))
        # A made-up but monotone accuracy: more bits, less error; later layers a little worse.
        accuracy = 1 - 0.6 * 2 ** (-total / numel) * (1 + 0.05 * layer)
        r = {"accuracy": accuracy, "total_bits": total}
        r.update({p: qp.get_dict() for p, qp in zip(projs, qps)})
        results.append(r)
    return results


def measure_quant() -> None:
    measurement = job.get("measurement", {})
    job.setdefault("last_module_idx", 0)
    index = job["last_module_idx"]
    done = 0
    while True:
        print_stage("Measuring", index, len(modules))
        index += 1
        if index >= len(modules):
            break
        key = modules[index]
        print(f" -- Layer: {key}")
        if key.endswith(("self_attn", "mlp")):
            measurement[key] = measure_module(index)
        pause(len(modules) - 1)
        job["measurement"] = dict(measurement)
        job["last_module_idx"] = index
        save_job()
        done += 1
        fail_here(f"measure_quant:{done}")
    print_stage("Measuring", len(modules), len(modules))
    exp = {"measurement": job["measurement"], "last_module_idx": job["last_module_idx"]}
    files = [os.path.join(job["out_dir"], "measurement.json")]
    if job["output_measurement"] is not None:
        files.append(job["output_measurement"])
    for fn in files:
        with open(fn, "w", encoding="utf8") as f:
            f.write(json.dumps(exp, indent=4))


def optimize() -> None:
    measurement = job["measurement"]
    slots = []
    numel = 0
    for i in range(layers):
        for grp, projs in (("self_attn", ATTN), ("mlp", MLP)):
            slots.append(sorted(measurement[f"model.layers.{i}.{grp}"], key=lambda o: o["total_bits"]))
            numel += sum(a * b for a, b in (linear_shape(f"model.layers.{i}.{grp}.{p}") for p in projs))
    budget = int(numel * job["bits"])
    choice = [0] * len(slots)
    cost = sum(s[0]["total_bits"] for s in slots)
    if cost > budget:
        print(" !! rfn max: target unattainable (double)")
        os._exit(1)
    improved = True
    while improved:  # greedy stand-in for sim_anneal: cheapest next step first
        improved = False
        steps = sorted((s[c + 1]["total_bits"] - s[c]["total_bits"], k) for k, (s, c) in enumerate(zip(slots, choice)) if c + 1 < len(s))
        for delta, k in steps:
            if cost + delta <= budget:
                cost += delta
                choice[k] += 1
                improved = True
                break
    for n in range(1, 241, 80):
        print_stage("Optimizing", n, 240)
    print_stage("Optimizing", 240, 240)
    job["strategy"] = {}
    for k, (s, c) in enumerate(zip(slots, choice)):
        job["strategy"][f"model.layers.{k // 2}.{'self_attn' if k % 2 == 0 else 'mlp'}"] = s[c]


def q_tensors(key: str, qp: QParams, rows: int, cols: int) -> dict[str, np.ndarray]:
    """EXL2 tensors for one linear layer, sized by the real qparams maths."""
    groups = 0
    remaining = rows
    weight_bits = 0
    tr = rows
    for b, p in zip(qp.bits, qp.bits_prop):
        g = math.ceil(min(rows * p, remaining) / qp.group_size[b])
        groups += g
        remaining -= g * qp.group_size[b]
        r = min(qp.group_size[b] * g, tr)
        tr -= r
        weight_bits += r * cols * b
    return {
        f"{key}.q_weight": np.zeros((max(1, weight_bits // 32 // cols), cols), dtype=np.int32),
        f"{key}.q_invperm": np.arange(rows, dtype=np.int32),
        f"{key}.q_scale": np.zeros((groups, cols * qp.scale_bits // 32), dtype=np.int32),
        f"{key}.q_scale_max": np.ones(groups, dtype=np.float16),
        f"{key}.q_groups": np.zeros(groups * 2, dtype=np.int16),
    }


def barrier() -> None:
    spec = ENV.get("QK_DOUBLE_BARRIER", "")
    if not spec:
        return
    folder, _, n = spec.rpartition(":")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(folder)) < int(n):
        if time.time() > deadline:
            print(" -- (double) barrier timed out", flush=True)
            return
        time.sleep(0.05)
    print(" -- (double) barrier passed", flush=True)


def quant() -> None:
    barrier()
    os.makedirs(os.path.join(job["out_dir"], "out_tensor"), exist_ok=True)
    qmods = modules[1:-2]
    for n, key in enumerate(qmods):
        print_stage("Quantizing", n, len(qmods))
        strat = job["strategy"][key]
        out = {}
        for p in ATTN if key.endswith("self_attn") else MLP:
            qp = QParams.from_dict(strat[p])
            rows, cols = linear_shape(f"{key}.{p}")
            out.update(q_tensors(f"{key}.{TENSOR[p]}", qp, rows, cols))
        save_file(out, os.path.join(job["out_dir"], "out_tensor", key + ".safetensors"))
        pause(len(qmods))
        fail_here(f"quant:{n + 1}")
    rows, cols = linear_shape("lm_head") if "lm_head.weight" in shapes else linear_shape("model.embed_tokens")
    save_file(q_tensors("lm_head", qparams_headoptions[job["head_bits"]], rows, cols),
              os.path.join(job["out_dir"], "out_tensor", "lm_head.safetensors"))
    print_stage("Quantizing", len(qmods), len(qmods))


def compile_model() -> None:
    out_dir = job["compile_full"] or job["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for k, (shape, _dtype, fn) in shapes.items():
        if k.endswith("norm.weight") or k.startswith("model.embed_tokens"):
            with safe_open(fn, framework="np") as f:
                tensors[k] = f.get_tensor(k).astype(np.float16)
    for fn in sorted(glob.glob(os.path.join(job["out_dir"], "out_tensor", "*.safetensors"))):
        with safe_open(fn, framework="np") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    shard_bytes = job["shard_size"] * 1024 ** 2
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        if shards[-1] and size + tensors[k].nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += tensors[k].nbytes
    for i, d in enumerate(shards):
        print_stage("Compiling", i, len(shards))
        save_file(d, os.path.join(out_dir, f"output_temp_{i + 1}.safetensors"))
    for i in range(len(shards)):
        final = "output.safetensors" if len(shards) == 1 else f"output-{i + 1:05}-of-{len(shards):05}.safetensors"
        os.rename(os.path.join(out_dir, f"output_temp_{i + 1}.safetensors"), os.path.join(out_dir, final))
    fail_here("compile:shards")
    if job["compile_full"] is not None:
        for name in os.listdir(in_dir):  # compile.py: every regular non-tensor file, stale index and README too
            src = os.path.join(in_dir, name)
            if os.path.isfile(src) and not name.endswith((".safetensors", ".bin")):
                shutil.copy(src, os.path.join(out_dir, name))
        ds = job["cal_dataset"]
        qcfg = {"quant_method": "exl2", "version": VERSION, "bits": job["bits"], "head_bits": job["head_bits"],
                "calibration": {"rows": job["dataset_rows"], "length": job["length"],
                                "dataset": os.path.split(ds)[1] if ds else "(default)"}}
        with open(os.path.join(out_dir, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = qcfg
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=4))
    print_stage("Compiling", len(shards), len(shards))


save_job()
while True:
    progress = job["progress"]
    fail_here(progress)
    if progress == "begin":
        if "reuse_measurement" in job:
            job["progress"] = "optimize"
        else:
            tokenize(measure=True)
            job["progress"] = "initial_embeddings"
        save_job()
    elif progress == "initial_embeddings" or progress == "embeddings":
        print_stage("Embeddings", 0, 1)
        print_stage("Embeddings", 1, 1)
        job["progress"] = "measure_quant" if progress == "initial_embeddings" else "quant"
        save_job()
    elif progress == "measure_quant":
        measure_quant()
        job["progress"] = "optimize" if job["output_measurement"] is None else "finished"
        save_job()
    elif progress == "optimize":
        optimize()
        job["progress"] = "tokens_cal"
        save_job()
    elif progress == "tokens_cal":
        tokenize(measure=False)
        job["progress"] = "embeddings"
        save_job()
    elif progress == "quant":
        quant()
        job["progress"] = "compile"
        save_job()
    elif progress == "compile":
        compile_model()
        job["progress"] = "finished"
        save_job()
    if job["progress"] == "finished":
        break
print(" -- Finished")
print(f" -- (double) end {time.time():.3f}", flush=True)
