#!/usr/bin/env bash
# The GPU proof in one command, from a bare GPU machine, within the device's 10 minutes:
#   1. install the carried wheels (.whl/, from scripts/gpu/fetch_wheels.sh) into /tmp/site;
#   2. JIT-build exllamav2's CUDA extension for this GPU only (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), timed;
#   3. build the random-weight Llama-3- and Mistral/Starling-shaped models (scripts/gpu/make_models.py);
#   4. through quantkit: measure, convert 8.0/6.5/5.0 with an 8-bit head, card, publish --to a local target;
#   5. scripts/gpu/measure_vram.py: load every branch with exllamav2, measure peak VRAM per cache and
#      context, compare with `quantkit vram`, write $OUT/vram.json, results.json, summary.md;
#   6. pack the small real artifacts (job files, measurement, configs, listings) for the test double.
#
# benchmarks/gpu/README.md gives the exact device call. Knobs (environment):
#   PROVE_BUDGET_S  seconds from start to finish everything (default 570; the device kills at 600)
#   PROVE_MODELS    "llama3 mistral" (make_models.py shape keys, done in this order)
#   PROVE_CONTEXTS  "4k,8k,16k,32k"    PROVE_CACHES "fp16,q4,q8,q6" (measured in this order)
#   PROVE_ROWS / PROVE_LENGTH / PROVE_CALIBRATION   calibration for quantkit measure (16 / 512 / quantkit's default)
#   PROVE_LAYERS / PROVE_HIDDEN   model size (make_models.py defaults: 4 layers, hidden 1024)
#   PROVE_STAGES    "install env build models pipeline vram artifacts"; a second call on a still-warm
#                   machine can run "install build vram artifacts": the extension (.torch_ext/) and the
#                   work folders (.gpu-work/) are kept inside the (git-ignored) checkout.
# Every stage is timed into $OUT/stages.tsv; a failed stage is recorded and the run goes on where it can.
# shellcheck disable=SC2317  # the stage functions are called through `stage NAME FUNCTION`
set -uo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/.gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/prove.log") 2>&1

BUDGET=${PROVE_BUDGET_S:-570}
DEADLINE=$((START + BUDGET))
MODELS=${PROVE_MODELS:-llama3 mistral}
CONTEXTS=${PROVE_CONTEXTS:-4k,8k,16k,32k}
CACHES=${PROVE_CACHES:-fp16,q4,q8,q6}
ROWS=${PROVE_ROWS:-16}
LENGTH=${PROVE_LENGTH:-512}
BITS=8.0,6.5,5.0
HEAD_BITS=8
STAGES_WANTED=${PROVE_STAGES:-install env build models pipeline vram artifacts}
WORKROOT=$REPO/.gpu-work
STAGES="$OUT/stages.tsv"
: >"$STAGES"
export PYTHONUNBUFFERED=1

# ---- the quantkit command lines: the one place to adjust when the CLI changes ----------------------
qk() { python3 -m quantkit "$@"; }
qk_measure() { qk measure "$1" --work "$2" ${PROVE_CALIBRATION:+--calibration "$PROVE_CALIBRATION"} --rows "$ROWS" --length "$LENGTH"; }
qk_convert() { qk convert "$1" --work "$2" --bits "$BITS" --head-bits "$HEAD_BITS"; }
qk_card() { qk card "$1" --repo "quantkit-proof/$(basename "$1")-exl2" --output "$1/card-preview.md"; }
qk_publish() { qk publish "$1" --repo "quantkit-proof/$(basename "$1")-exl2" --to "$2"; }
# -----------------------------------------------------------------------------------------------------

FAILED=0
wanted() { [[ " $STAGES_WANTED " == *" $1 "* ]]; }
left() { echo $((DEADLINE - $(date +%s))); }

# stage NAME COMMAND...: run it in this shell, time it, record "NAME<TAB>seconds<TAB>status".
stage() {
    local name=$1 t0=$EPOCHREALTIME rc
    shift
    echo "== $(date -u +%H:%M:%S) $name: $* ($(left) s left)"
    "$@"
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        printf '%s\t%s\tok\n' "$name" "$secs" >>"$STAGES"
    else
        printf '%s\t%s\tfailed (exit %s)\n' "$name" "$secs" "$rc" >>"$STAGES"
        FAILED=1
    fi
    echo "== $name: exit $rc after ${secs}s"
    return $rc
}

skip() { printf '%s\t0\tskipped (%s)\n' "$1" "$2" >>"$STAGES"; echo "== $1: skipped ($2)"; }

install_wheels() {
    # The device README's line, verbatim; then quantkit itself from this checkout.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    export PYTHONPATH=$PYTHONPATH:$REPO
    python3 -c "import pydantic, fastparquet, websockets, huggingface_hub, quantkit; print('quantkit', quantkit.__version__, 'huggingface_hub', huggingface_hub.__version__)"
}

record_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nvcc --version | tail -2
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed (the dynamic generator runs unpaged)"
    nproc
}

build_extension() {
    # exllamav2 0.3.2 ships no binary on PyPI: `import exllamav2` compiles exllamav2_ext with torch's
    # cpp_extension (ninja). Restrict it to this GPU and use every core; keep the build in the checkout.
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$REPO/.torch_ext
    python3 -c "
import exllamav2, exllamav2.ext as ext
print('exllamav2', exllamav2.__version__, 'extension', ext.exllamav2_ext.__file__)"
}

make_models() {
    local args=()
    [[ -n ${PROVE_LAYERS:-} ]] && args+=(--layers "$PROVE_LAYERS")
    [[ -n ${PROVE_HIDDEN:-} ]] && args+=(--hidden "$PROVE_HIDDEN")
    for m in $MODELS; do
        python3 scripts/gpu/make_models.py "$WORKROOT/models" --shape "$m" "${args[@]}" || return
    done
}

model_dir() { python3 -c "import sys; sys.path.insert(0, 'scripts/gpu'); import make_models; print(make_models.SHAPES['$1'].name)"; }

pipeline() {
    local name=$1 src=$WORKROOT/models/$1 work=$WORKROOT/work/$1
    qk_measure "$src" "$work" || return
    qk_convert "$src" "$work" || return
    qk_card "$work" || return
    qk_publish "$work" "$WORKROOT/published/$name"
}

measure_vram() {
    local cases=()
    for m in $MODELS; do
        local name
        name=$(model_dir "$m")
        [[ -d $WORKROOT/work/$name/out ]] && cases+=(--case "$name" "$WORKROOT/models/$name" "$WORKROOT/work/$name")
    done
    ((${#cases[@]})) || { echo "no converted model to measure"; return 1; }
    python3 scripts/gpu/measure_vram.py "${cases[@]}" --out "$OUT" --contexts "$CONTEXTS" --caches "$CACHES" \
        --deadline $((DEADLINE - 15)) --stages "$STAGES" --command "bash scripts/gpu/prove.sh (PROVE_STAGES=\"$STAGES_WANTED\")"
}

pack_artifacts() {
    # The real converter's small outputs, to make the test double behave like it:
    # job files, measurement, configs, cards, logs and a listing of every file with its size, no weights.
    # $OUT comes back as at most 8 files: prove.log, stages.tsv, vram.json, results.json, summary.md, this.
    mkdir -p "$WORKROOT"
    (cd "$WORKROOT" && find . -printf '%s\t%p\n' | sort -k2) >"$WORKROOT/work-files.tsv"
    if [[ -f $REPO/.torch_ext/exllamav2_ext/build.ninja ]]; then cp "$REPO/.torch_ext/exllamav2_ext/build.ninja" "$WORKROOT/"; fi
    for d in "$WORKROOT"/published/*; do
        if [[ -d $d/.git ]]; then git -C "$d" log --all --oneline --decorate >"$d.git-log.txt"; fi
    done
    (cd "$WORKROOT" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \
        -o -name '*.tsv' -o -name 'build.ninja' \) ! -name 'tokenizer.json' -size -4M -print0) |
        tar -czf "$OUT/artifacts.tar.gz" -C "$WORKROOT" --null -T -
    ls -la "$OUT"
}

wanted install && { stage install install_wheels || exit 1; }
wanted env && stage env record_env
if wanted build; then
    stage build_extension build_extension || {
        echo "exllamav2_ext did not build: the compiler output is above (and in $OUT/prove.log)"
        python3 scripts/gpu/measure_vram.py --out "$OUT" --stages "$STAGES" --command "bash scripts/gpu/prove.sh" \
            --report-only "exllamav2 0.3.2's extension did not build against this torch/CUDA: see prove.log"
        wanted artifacts && pack_artifacts
        exit 1
    }
fi
wanted models && stage models make_models
if wanted pipeline; then
    for m in $MODELS; do
        name=$(model_dir "$m")
        if (($(left) < 180)); then skip "pipeline_$name" "$(left) s left"; continue; fi
        stage "pipeline_$name" pipeline "$name"
    done
fi
wanted vram && stage vram measure_vram
wanted artifacts && stage artifacts pack_artifacts
echo "== done in $(($(date +%s) - START)) s; stages:"
cat "$STAGES"
exit $FAILED
