#!/usr/bin/env bash
# GPU check (issue 17 item 6): static shapes and torch.compile on one lent GPU, in at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (CUDA device 0), from any directory
#   DRY=1 bash benchmarks/gpu_check.sh        # or --dry: every step with tiny sizes on the CPU (~3 min)
#
# Steps, in this order (each under `timeout`, all within BUDGET_S seconds, default 470; a step that
# fails or runs out of time is reported and the next one runs):
#   env       torch / CUDA / cuDNN / triton / diffusers versions, the device's name, nvidia-smi -L
#   fwd-b8    DiT-XL/2 (random weights, tclab.models preset, speed only), one cached forward at batch 8:
#             full eager and full compiled, interleaved with the cached paths dynamic (eager), static
#             (static_shapes=True, eager) and static-compiled; kv all, rho 0.25 and 0.1; the run's second
#             cached step timed (steady state); compile seconds printed apart
#   sampling  the embedded shapes-dit, 50 DDIM steps, 4 images, guidance 4 (prev-change scores, TPRR):
#             full eager / full compiled vs cached dynamic eager, static eager, static compiled
#   fwd-b32   as fwd-b8 at batch 32
# Everything is float32, as the session-6 check (benchmarks/RESULTS.md, "GPU check").
#
# Output: $OUT if set (the device tool's output folder), else /tmp/gpu_check: <step>.log (the printed
# rows), <step>.json (bench_cache.py --out, rewritten after every measured setting, so a step cut short
# keeps what it measured), summary.txt (exit status and seconds of each step).
#
# Knobs (environment): BUDGET_S (total seconds, default 470), STEPS (default "env fwd-b8 sampling fwd-b32"),
# REPEATS_FWD (7), REPEATS_SAMPLING (5), RHOS ("0.25 0.1"), PATHS (dynamic,static,static-compiled; add
# dynamic-compiled for the diagnostic), SAMPLING_SCORER (prev-change; learned-static is the configuration of
# benchmarks/bench_compile.py), COMPILE_MODE (torch.compile mode, default inductor's), PYTHON (python3).
# The machine needs torch (its own CUDA build is fine; triton and a C compiler for the compiled paths: without
# them the compiled paths are dropped with a message and the eager rows still come) and tclab's imports
# (diffusers, huggingface_hub, safetensors, numpy, scipy, pillow, tqdm, pyyaml); the repository itself is put
# on PYTHONPATH. Missing ones can come as wheels in WHEELS (a folder, default ./.gpu_wheels, carried with the
# run), e.g. made here beforehand with `pip download --no-deps diffusers==0.42.1 -d .gpu_wheels`: the script
# installs them with `pip install --no-index --no-deps --target` into a temporary folder.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
DRY=${DRY:-0}
[ "${1:-}" = "--dry" ] || [ "${1:-}" = "--device-smoke" ] && DRY=1
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR" || exit 1
BUDGET=${BUDGET_S:-470}
STEPS=${STEPS:-env fwd-b8 sampling fwd-b32}
RHOS=${RHOS:-0.25 0.1}
PATHS_=${PATHS:-dynamic,static,static-compiled}
SCORER=${SAMPLING_SCORER:-prev-change}
COMPILE=()
[ -n "${COMPILE_MODE:-}" ] && COMPILE=(--compile-mode "$COMPILE_MODE")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    # tiny sizes on the CPU: the embedded model (6 blocks) for every step, one rho, one timed round
    DEVICE=cpu; FWD_MODEL=shapes-dit; B_SMALL=2; B_LARGE=2; STEPS_N=8; IMAGES=1; RHOS=${DRY_RHOS:-0.1}
    REP_F=1; REP_S=1; CAP_ENV=60; CAP_F1=120; CAP_S=120; CAP_F2=120; BUDGET=${BUDGET_S:-300}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=cuda; FWD_MODEL=DiT-XL/2; B_SMALL=8; B_LARGE=32; STEPS_N=50; IMAGES=4
    REP_F=${REPEATS_FWD:-7}; REP_S=${REPEATS_SAMPLING:-5}; CAP_ENV=60; CAP_F1=170; CAP_S=140; CAP_F2=170
fi

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), dry=$DRY, device $DEVICE, budget ${BUDGET}s, output $OUTDIR"
echo "gpu_check: steps: $STEPS; rhos $RHOS; paths $PATHS_"
: > "$OUTDIR/summary.txt"

# tclab's imports from wheels, when the machine lacks them
WHEELS=${WHEELS:-$ROOT/.gpu_wheels}
if ! "$PY" -c "import diffusers, huggingface_hub, safetensors, scipy, yaml, PIL, tqdm" >/dev/null 2>&1; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        DEPS=/tmp/gpu_check_pydeps
        echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into $DEPS"
        timeout 90 "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$DEPS"
    else
        echo "gpu_check: WARNING: some of tclab's imports are missing and $WHEELS has no wheels; steps will fail"
    fi
fi

# run one step: name, cap (s), command...; its timeout is the cap or what is left of the budget
step() {
    local name=$1 cap=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET - SECONDS)) t=$cap
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUTDIR/summary.txt"
        return 0
    fi
    echo; echo "== $name (timeout ${t}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$t" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]} note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
    echo "== $name: rc $rc$note, $((SECONDS - t0)) s" | tee -a "$OUTDIR/summary.txt"
}

step env "$CAP_ENV" "$PY" - "$DEVICE" <<'EOF'
import importlib, platform, shutil, subprocess, sys
import torch
want = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (build) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
      f"threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {torch.cuda.get_device_name(0)}, capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s); "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
else:
    print("CUDA: not available")
for mod in ("triton", "diffusers", "numpy", "huggingface_hub", "safetensors"):
    try:
        print(f"{mod} {importlib.import_module(mod).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: not importable ({type(e).__name__}: {e})")
print("C compiler:", shutil.which("gcc") or shutil.which("cc") or shutil.which("clang") or "none")
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "-L"], timeout=20)
import tclab  # noqa: F401,E402
print("tclab imports from", tclab.__file__)
if want == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with DRY=1 for the CPU smoke run")
EOF

BENCH=("$PY" benchmarks/bench_cache.py --device "$DEVICE" --kv all --rhos $RHOS --paths "$PATHS_" ${COMPILE[@]+"${COMPILE[@]}"})
step fwd-b8 "$CAP_F1" "${BENCH[@]}" --part forward --forward-model "$FWD_MODEL" --forward-batch "$B_SMALL" \
    --cached-step 2 --repeats "$REP_F" --out "$OUTDIR/fwd-b8.json"
step sampling "$CAP_S" "${BENCH[@]}" --part sampling --sampling-model shapes-dit --steps "$STEPS_N" \
    --batch "$IMAGES" --guidance 4 --scorer "$SCORER" --repeats "$REP_S" --out "$OUTDIR/sampling.json"
step fwd-b32 "$CAP_F2" "${BENCH[@]}" --part forward --forward-model "$FWD_MODEL" --forward-batch "$B_LARGE" \
    --cached-step 2 --repeats "$REP_F" --out "$OUTDIR/fwd-b32.json"

echo; echo "gpu_check: done in ${SECONDS}s; results in $OUTDIR"
cat "$OUTDIR/summary.txt"
