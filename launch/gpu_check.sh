#!/usr/bin/env bash
# Measure pjit_llm on one GPU in one go: to validate a new machine (or a node of a new cluster)
# and to refresh BENCHMARKS.md's GPU rows. About 10 minutes on an H100/H200, most of it
# compiling. From a checkout, with jax[cuda], flax, optax and orbax-checkpoint installed:
#
#   bash launch/gpu_check.sh OUT_DIR [--wheels DIR] [--budget SECONDS] [--only PARTS]
#                                    [--dry-run] [--smoke]
#
# Parts, in this order (the most valuable first):
#   env       the GPU (nvidia-smi), the commit and the Python packages' versions
#   tests     the GPU tests: PJIT_LLM_TEST_GPU=1 python -m pytest -m gpu tests
#   llama     `python -m pjit_llm.bench step` rows of configs/bench-llama-1b.yaml: its base and
#             each variant in LLAMA_VARIANTS below, one process per row
#   gpt2      the same for configs/bench-gpt2-small.yaml (GPT2_VARIANTS), and a 2-step
#             profile of its base row with a table of where the step's time goes
#   generate  `python -m pjit_llm.bench generate` at the Llama-1B shape (random bfloat16
#             weights), batches of 1, 8 and 64, with XLA's command buffers (CUDA graphs) as
#             XLA sets them (and then also with model.decode_unroll=8), off, and extended to
#             loops (GENERATE_FLAGS)
#   train     `python -m pjit_llm.train` at the Llama-1B shape on the built-in corpus: 30 steps
#             ending in a checkpoint, then a restart that resumes and runs to step 35; its
#             logged speed over steps 10-30 becomes a row beside the benchmark's base
#   profile   a 2-step profile of the Llama-1B base row, and where its time goes
#   fp8loss   fp8's loss curve against bfloat16: 200 training steps of the GPT-2 shape on the
#             built-in corpus in bfloat16, fp8 with current and with delayed scaling, and
#             each one's held-out loss beside bfloat16's (fp8loss.md; goal: within 1 %)
#   moe       the Llama-1B shape as a Mixtral of 8 experts half as wide, 2 per token (the
#             dense model's active parameters): dropless with ragged_dot (grouped GEMMs), with
#             the CPU's blocks, and in capacity mode (MOE_VARIANTS); beside the llama base row
#   plan      `python -m pjit_llm.plan` of the Llama-1B row on this one GPU, calibrated: the
#             planner's predicted step against 5 measured steps for 4 of its candidates
#
# Every row runs in its own process under its own time limit and writes under OUT_DIR as it
# goes: a row that fails or outlasts its limit is recorded with its last line and the next
# starts; a run cut short keeps what it finished. OUT_DIR (new or empty) ends with 10 files:
#   summary.md           the environment, every row's status, the tables (each row beside its
#                        config's base row, with ratios) and where the profiled steps' time went
#   log.txt              each command with its limit, time and exit status, and its stderr
#   tests.txt            pytest's report
#   steps.jsonl          step rows, as `bench step --json` prints them, and the failed ones
#   generate.jsonl       generation rows, likewise
#   train.txt            the training runs' console output
#   profile-gpt2.tgz, profile-llama.tgz   the traces (TensorBoard's profile tab, or Perfetto)
#   fp8loss.md           the fp8 runs' held-out losses beside bfloat16's
#   plan.txt             the plan's table and its calibration
# `python -m pjit_llm.bench_report table OUT_DIR/*.jsonl` prints the tables again.
#
# Options:
#   --wheels DIR   first install the wheels in DIR (pip --no-index, into a temporary folder):
#                  grain, tensorflow-datasets and their requirements where the machine lacks
#                  them (the train part, and the GPU test that trains, need them)
#   --budget S     start no row once less than half its limit is left of S seconds, and cut
#                  a row's limit to what is left (default 570: the whole run ends within
#                  about 10 minutes; 0: no budget)
#   --only LIST    only these parts, comma-separated (e.g. --only env,llama,gpt2)
#   --dry-run      print each command with its time limit; run nothing
#   --smoke        every part at the size of configs/tiny.yaml: checks this script on any
#                  machine, a GPU or not, in a few minutes
# Environment: PYTHON (default python3); XLA_FLAGS is passed on (rows record it).
set -u

# The base row keeps attention's output and statistics (remat proj_attn) and gives cuDNN the
# packed documents' offsets (max_segments 16); each variant takes one of them away or adds fp8.
LLAMA_VARIANTS=(
  "model.remat=proj model.max_segments=0"       # both away: the base row measured on 2026-12-04
  "model.max_segments=0"                        # the documents as a dense (B, 1, L, L) mask
  "model.segment_mask=false"                    # plain causal: what offsets should cost (goal: within 3 %)
  "model.remat=proj"                            # attention's forward recomputed in the backward pass
  "model.matmul=fp8"                            # fp8 projections, current scaling
  "model.matmul=fp8 model.fp8_scaling=delayed"  # fp8 with scales from past steps' amax
)
GPT2_VARIANTS=("model.scan_layers=false" "model.loss_chunk=0")
MOE_VARIANTS=("model.expert_matmul=blocks" "model.expert_capacity_factor=1.25")
# Checked against the flag tables of jaxlib 0.10.2 and 0.11.2 (XLA aborts on an unknown flag).
GENERATE_FLAGS=(
  ""                                            # XLA's own choice of command buffers
  "--xla_gpu_enable_command_buffer="            # none: every kernel launched on its own
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
)

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "error: $*" >&2; exit 2; }

OUT="" WHEELS="" BUDGET=570 ONLY="env,tests,llama,gpt2,generate,train,profile,fp8loss,moe,plan" DRY=0 SMOKE=0
while (($#)); do
  case $1 in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --only) ONLY=${2:?--only needs parts}; shift ;;
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) fail "unknown option $1; see bash $0 --help" ;;
    *) [ -z "$OUT" ] || fail "one OUT_DIR only (got $OUT and $1)"; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || fail "give OUT_DIR, a new or empty folder for the results: bash $0 OUT_DIR"
[[ $BUDGET =~ ^[0-9]+$ ]] || fail "--budget $BUDGET is not a number of seconds"
for p in ${ONLY//,/ }; do
  [[ ,env,tests,llama,gpt2,generate,train,profile,fp8loss,moe,plan, == *,$p,* ]] || fail "no part '$p' (--only)"
done
if ((!DRY)) && [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  fail "$OUT is not empty; give a new or empty folder, so that rows of two runs do not mix"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
((DRY)) || { mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")   # traces, a run directory, caches
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
: >"$WORK/status.md"
DRY_TOTAL=0  # --dry-run: the sum of the limits
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Rows that compile the same step (a profile of a base row, a resumed run) compile it once.
export JAX_COMPILATION_CACHE_DIR="$WORK/jax-cache"
USER_XLA_FLAGS=${XLA_FLAGS:-}

if ((SMOKE)); then
  LLAMA=configs/tiny.yaml GPT2=configs/tiny.yaml PLAN_KIND=cpu
  LLAMA_STEPS=(--steps 2 --warmup 1) GPT2_STEPS=(--steps 2 --warmup 1)
  GENERATE=(--batch 1 --batch 2 --prompt-len 16 --new-tokens 8 --repeats 1)
  TRAIN_STEPS=(6 8 2) TRAIN_SHAPE=(train.log_every=2 train.eval_every=3) FP8_STEPS=4 FP8_WARMUP=1
else
  LLAMA=configs/bench-llama-1b.yaml GPT2=configs/bench-gpt2-small.yaml PLAN_KIND=h200
  LLAMA_STEPS=(--steps 5 --warmup 2) GPT2_STEPS=(--steps 10 --warmup 2)
  GENERATE=(--batch 1 --batch 8 --batch 64 --prompt-len 128 --new-tokens 128 --repeats 3)
  TRAIN_STEPS=(30 35 10) TRAIN_SHAPE=(train.log_every=5 train.eval_every=15) FP8_STEPS=200 FP8_WARMUP=20
fi
GENERATE_OVERRIDES=(model.param_dtype=bfloat16)

T0=$SECONDS
say() { ((DRY)) || echo "== $(date +%T) $*" | tee -a "$LOG"; }
want() { [[ ,$ONLY, == *,$1,* ]]; }

note() {  # note NAME STATUS SECONDS LAST_LINE: one line of summary.md's table of rows
  local line
  line="| $1 | $2 | $3 | ${4//|/\\|} |"
  echo "$line" >>"$WORK/status.md"
  echo "   $2 after $3${4:+: $4}" | tee -a "$LOG"
}

LAST_ERROR=""
run() {  # run LIMIT STDOUT_FILE NAME COMMAND...: one command; its status (99: not started)
  local limit=$1 dest=$2 name=$3 left from start rc
  shift 3
  if ((BUDGET > 0)); then  # a row starts only with half its limit (30 s at least) left
    left=$((BUDGET - (SECONDS - T0)))
    if ((left < limit / 2 || left < 30)); then
      ((DRY)) || note "$name" "not started" "" "${left}s left of the ${BUDGET}s budget, under half its ${limit}s limit"
      return 99
    fi
    ((limit > left)) && limit=$left
  fi
  if ((DRY)); then
    printf '[limit %4ss] %s\n' "$limit" "$*"
    DRY_TOTAL=$((DRY_TOTAL + limit))
    return 0
  fi
  say "$name (limit ${limit}s): $*"
  from=$(wc -c <"$LOG")
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$dest" 2>>"$LOG"
  rc=$?
  LAST_ERROR=""
  if ((rc == 124 || rc == 137)); then
    LAST_ERROR="stopped at its limit of ${limit}s"
  elif ((rc != 0)); then
    LAST_ERROR=$(tail -c +"$((from + 1))" "$LOG" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-300)
  fi
  note "$name" "exit $rc" "$((SECONDS - start))s" "$LAST_ERROR"
  summarise
  return "$rc"
}

step_row() {  # step_row LIMIT PART CONFIG [OVERRIDES...]: one `bench step` row into steps.jsonl
  local limit=$1 part=$2 config=$3 steps rc
  shift 3
  if [ "$part" = llama ]; then steps=("${LLAMA_STEPS[@]}"); else steps=("${GPT2_STEPS[@]}"); fi
  run "$limit" "$OUT/steps.jsonl" "$part ${*:-base}" \
    "$PY" -m pjit_llm.bench step --json "${steps[@]}" --config "$config" "$@"
  rc=$?
  if ((rc != 0 && rc != 99)); then
    "$PY" -m pjit_llm.bench_report failed --bench step --error="$LAST_ERROR" \
      --config "$config" --xla-flags="$USER_XLA_FLAGS" "$@" >>"$OUT/steps.jsonl"
    summarise
  fi
}

generate_row() {  # generate_row LIMIT FLAGS [BENCH ARGS...]: generation rows under these XLA flags
  local limit=$1 flags="${USER_XLA_FLAGS:+$USER_XLA_FLAGS }$2" rc
  shift 2
  run "$limit" "$OUT/generate.jsonl" "generate ${flags:-(command buffers as XLA sets them)}" \
    env "XLA_FLAGS=$flags" "$PY" -m pjit_llm.bench generate --json "${GENERATE[@]}" \
    --config "$LLAMA" "$@" "${GENERATE_OVERRIDES[@]}"
  rc=$?
  if ((rc != 0 && rc != 99)); then
    "$PY" -m pjit_llm.bench_report failed --bench generate --error="$LAST_ERROR" \
      --config "$LLAMA" --xla-flags="$flags" "${GENERATE_OVERRIDES[@]}" >>"$OUT/generate.jsonl"
    summarise
  fi
}

profile() {  # profile NAME CONFIG LIMIT: a 2-step trace, the table of its time, its archive
  local name=$1 config=$2
  rm -rf "${WORK:?}/profile-$name"
  run "$3" "$LOG" "$name: 2-step profile" "$PY" -m pjit_llm.bench step --steps 2 --warmup 1 \
    --config "$config" --profile "$WORK/profile-$name" || return
  ((DRY)) && return
  tar -czf "$OUT/profile-$name.tgz" -C "$WORK" "profile-$name"
  run 60 "$WORK/kernels-$name.md" "$name: where the profiled time goes" \
    "$PY" -m pjit_llm.bench_report trace "$WORK/profile-$name" --top 15
}

summarise() {  # summary.md from what has been written so far
  ((DRY)) && return
  local rows=() f k
  for f in "$OUT/steps.jsonl" "$OUT/generate.jsonl"; do [ -s "$f" ] && rows+=("$f"); done
  {
    echo "# pjit_llm on one GPU: launch/gpu_check.sh"
    echo
    echo "## Environment"
    echo
    echo '```'
    cat "$WORK/env.txt" 2>/dev/null
    echo '```'
    echo
    echo "## Commands run"
    echo
    echo "| row | status | time | last line |"
    echo "|---|---|---|---|"
    cat "$WORK/status.md"
    if ((${#rows[@]})); then
      echo
      echo "## Rows"
      echo
      "$PY" -m pjit_llm.bench_report table "${rows[@]}" 2>&1
    fi
    for k in "$WORK"/kernels-*.md; do
      [ -s "$k" ] || continue
      k=${k##*/kernels-}
      echo
      echo "## Where the profiled ${k%.md} step's time goes"
      echo
      cat "$WORK/kernels-$k"
    done
  } >"$OUT/summary.md.new" && mv "$OUT/summary.md.new" "$OUT/summary.md"
}

if [ -n "$WHEELS" ] && ((!DRY)); then
  say "installing the wheels in $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 || fail "could not install the wheels in $WHEELS (see $LOG)"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
SIZES=$( ((SMOKE)) && echo "the sizes of configs/tiny.yaml" || echo "full size")
say "start: $ROOT into $OUT; budget ${BUDGET}s; $SIZES"

if want env; then
  ((DRY)) || { echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
               echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
               echo "XLA_FLAGS: ${USER_XLA_FLAGS:-none beyond the defaults of pjit_llm/xla_flags.py}"; } >"$WORK/env.txt"
  run 30 "$WORK/env.txt" "env: nvidia-smi" \
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  run 60 "$WORK/env.txt" "env: packages" "$PY" -c '
import importlib.metadata as m, platform, jax
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "not installed"
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain", "tensorflow-datasets")
print("python", platform.python_version() + ";", ", ".join(f"{n} {version(n)}" for n in names))
print("devices:", jax.devices())'
fi

if want tests; then
  run 300 "$OUT/tests.txt" "tests: PJIT_LLM_TEST_GPU=1 pytest -m gpu" env PJIT_LLM_TEST_GPU=1 \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
fi

if want llama; then
  step_row 180 llama "$LLAMA"  # the first compile of the shape also warms the autotuner's caches
  for v in "${LLAMA_VARIANTS[@]}"; do
    # shellcheck disable=SC2086  # a variant is several key=value words
    step_row 100 llama "$LLAMA" $v
  done
fi

if want gpt2; then
  step_row 90 gpt2 "$GPT2"
  for v in "${GPT2_VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    step_row 75 gpt2 "$GPT2" $v
  done
  profile gpt2 "$GPT2" 75
fi

if want generate; then
  # with XLA's own command buffers, also 8 decode steps per loop iteration (one host round trip)
  generate_row 200 "${GENERATE_FLAGS[0]}" --variant model.decode_unroll=8
  for f in "${GENERATE_FLAGS[@]:1}"; do generate_row 120 "$f"; done
fi

if want train; then
  if ((DRY)) || "$PY" -c "import grain, tensorflow_datasets" 2>/dev/null; then
    TRAIN=(--config "$LLAMA" data.source=builtin "data.data_dir=$WORK/data" optimizer.warmup_steps=5
           checkpoint.every=0 "${TRAIN_SHAPE[@]}" "train.run_dir=$WORK/train-run")
    if run 240 "$OUT/train.txt" "train: ${TRAIN_STEPS[0]} steps and a checkpoint" \
        "$PY" -m pjit_llm.train "${TRAIN[@]}" "train.steps=${TRAIN_STEPS[0]}"; then
      ((DRY)) || { "$PY" -m pjit_llm.bench_report loop "$WORK/train-run/metrics.jsonl" \
                     --after "${TRAIN_STEPS[2]}" --config "$LLAMA" >>"$OUT/steps.jsonl" 2>>"$LOG"
                   summarise; }
      run 150 "$OUT/train.txt" "train: resumed to step ${TRAIN_STEPS[1]}" \
        "$PY" -m pjit_llm.train "${TRAIN[@]}" "train.steps=${TRAIN_STEPS[1]}"
    fi
    rm -rf "$WORK/train-run"
  else
    note "train" "not started" "" "grain and tensorflow-datasets do not import here: give --wheels DIR"
  fi
fi

if want profile; then
  profile llama "$LLAMA" 90
fi

if want fp8loss; then
  if ((DRY)) || "$PY" -c "import grain, tensorflow_datasets" 2>/dev/null; then
    FP8_RUNS=("model.matmul=default" "model.matmul=fp8" "model.matmul=fp8 model.fp8_scaling=delayed")
    for i in "${!FP8_RUNS[@]}"; do
      # shellcheck disable=SC2086  # a run's overrides are several key=value words
      run 120 "$OUT/train.txt" "fp8loss: ${FP8_RUNS[$i]}" "$PY" -m pjit_llm.train --config "$GPT2" \
        data.source=builtin "data.data_dir=$WORK/data" "optimizer.warmup_steps=$FP8_WARMUP" checkpoint.every=0 \
        train.sample_tokens=0 train.log_every=50 "train.eval_every=$FP8_STEPS" \
        "train.steps=$FP8_STEPS" "train.run_dir=$WORK/fp8loss-$i" ${FP8_RUNS[$i]}
    done
    ((DRY)) || "$PY" - "$WORK" "${FP8_RUNS[@]}" >"$OUT/fp8loss.md" 2>>"$LOG" <<'PYEOF'
import json, sys
work, runs = sys.argv[1], sys.argv[2:]
def last_eval(i):
    try:
        rows = [json.loads(l) for l in open(f"{work}/fp8loss-{i}/metrics.jsonl")]
    except OSError:
        return None
    return next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None)
losses = [last_eval(i) for i in range(len(runs))]
print(f"| run | held-out loss at the last step | vs {runs[0]} |\n|---|---|---|")
for run, loss in zip(runs, losses):
    ratio = f"{loss / losses[0] - 1:+.2%}" if loss and losses[0] else ""
    print(f"| {run} | {loss if loss is not None else 'failed'} | {ratio} |")
PYEOF
  else
    note "fp8loss" "not started" "" "grain and tensorflow-datasets do not import here: give --wheels DIR"
  fi
fi

if want moe; then
  MOE=(model.family=mixtral model.num_experts=8 model.experts_per_token=2)
  if ((SMOKE)); then MOE+=(model.mlp_dim=384); else MOE+=(model.mlp_dim=4096); fi
  # shellcheck disable=SC2086
  step_row 150 llama "$LLAMA" "${MOE[@]}"
  for v in "${MOE_VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    step_row 120 llama "$LLAMA" "${MOE[@]}" $v
  done
fi

if want plan; then
  run 240 "$OUT/plan.txt" "plan: predicted against measured" \
    "$PY" -m pjit_llm.plan --config "$LLAMA" --devices 1 --device "$PLAN_KIND" \
    --calibrate 4 --steps 5 --cache "$WORK/plans"
fi

if ((DRY)); then
  echo "at most ${DRY_TOTAL}s in all (each row at its limit; the budget is ${BUDGET}s)"
  exit 0
fi
summarise
say "end after $((SECONDS - T0))s: $OUT/summary.md"
cat "$OUT/summary.md"
