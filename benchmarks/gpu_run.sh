#!/usr/bin/env bash
# The GPU benchmarks on a machine with no package index, one step after another (BENCHMARKS.md, "GPU (H200)").
#   bash benchmarks/gpu_run.sh STEP...
# Steps:
#   stage NN        copy the carried part .gpu-stage/partNN to /tmp/stage (made by benchmarks/gpu_stage.sh)
#   check           unpack the parts once (vLLM, bitsandbytes, TRL, Liger, tokenizer) and import everything
#   prepare         make the random 8B model and 256 + 8 adapters (the tokenizer is added once unpacked)
#   serve-baseline  prepare, then `loraplex serve` with its own sizing, then first requests to new adapters
#   serve-compare   vLLM's OpenAI server with the same LoRA settings, then loraplex with one slot per adapter
#   serve-slots     loraplex with --max-loras ${SLOTS:-256} (SLOTS=registry: its own sizing for the registry on this
#                   GPU) and the server flags in $SERVER_ARGS, alone ($RUN_TAG
#                   names the run when only environment variables differ, e.g. VLLM_TUNED_CONFIG_FOLDER; COLD=1
#                   also times first requests to new adapters)
#   serve-vllm      vLLM's OpenAI server alone, with loraplex's LoRA sizing and kernel configs for this registry
#                   and its compact LoRA grid (vLLM's --worker-extension-cls); $CASES, $SLOTS, $SERVER_ARGS as
#                   for serve-slots; PROFILE_CASES=8,32 then runs those once more under vLLM's profiler and reports
#                   GPU kernel time by kind)
#   serve-pair      loraplex and vLLM's server on the one GPU (--gpu-memory-utilization ${PAIR_GPU_SHARE:-0.45} each),
#                   each case ${REPEATS:-3} times to each in alternating order; $CASES, $SLOTS, $SERVER_ARGS as above
#   tune-lora       `loraplex tune-lora-kernels` for ${SLOTS:-16} slots into $LORA_CONFIGS (serve it with
#                   VLLM_TUNED_CONFIG_FOLDER or --lora-kernel-configs), within ${TUNE_BUDGET_S:-300} s of search,
#                   ${TUNE_PASSES:-1} coordinate-descent passes, over the batch sizes in $TUNE_BATCHES (default: the tuner's)
#   grid-bench      vLLM's LoRA kernels with vLLM's grid and with loraplex's compact grid (benchmarks/gpu_lora_grid.py)
#   lora-load       where the time of loading one adapter into vLLM's CPU cache and a GPU slot goes
#                   (benchmarks/gpu_lora_load.py; an eager engine with ${SLOTS:-16} slots and ${PRELOAD:-128} adapters
#                   loaded first, for add_adapter's parts; LORA_LOAD_ONLY=engine,... runs only those settings)
#   detach STEP...  the remaining steps in a new process session: they outlive this command (not the machine;
#                   their time limit is ${DETACHED_LIMIT_S:-1500} s, not RUN_LIMIT_S),
#                   so the next command can start while an engine compiles; results and logs go to $KEEP
#   wait SECONDS    wait up to SECONDS for the detached steps, then copy their results and log tails to $OUT
#   train           QLoRA recipes, each in its own process, merged into one result
# Results and logs go to $OUT (default /tmp/out); results/ in this tree gets them by hand after the run.
set -uo pipefail
OUT=${OUT:-/tmp/out}
SITE=${SITE:-/tmp/site} WORK=${WORK:-/tmp/bench}
mkdir -p "$OUT" "$WORK"
# PYTHONSAFEPATH: `python -m loraplex` must not import this tree's loraplex/ (which lacks serve/, train/...)
export PYTHONSAFEPATH=1 PYTHONPATH=$SITE:$WORK/lp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false LORAPLEX_HOME=$WORK/home BENCH_SERVER_PIDS=$WORK/server.pids
MODEL=$WORK/model-8b REG=$WORK/registry NEW=$WORK/new-adapters LORA_CONFIGS=${LORA_CONFIGS:-$WORK/lora-configs}
KEEP=${KEEP:-/tmp/keep}
STARTED=$(date +%s)
BENCH_ARGS=${BENCH_ARGS:-}  # extra gpu_serve.py bench flags, for dry runs on CPU
FEWER_CASES=base,1,32,256-uniform,256-zipf,base  # the one-server steps' cases unless $CASES names others

say() { echo "[gpu_run $(( $(date +%s) - STARTED ))s] $*"; }
left() { local s=$(( ${RUN_LIMIT_S:-570} - ($(date +%s) - STARTED) )); echo $(( s > 1 ? s : 1 )); }  # seconds this run has left

stop_leftover_servers() {  # servers run in their own process group; a run cut short can leave one behind
  [ -f "$BENCH_SERVER_PIDS" ] || return 0
  while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null; done < "$BENCH_SERVER_PIDS"
  sleep 2
  while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null; done < "$BENCH_SERVER_PIDS"
  rm -f "$BENCH_SERVER_PIDS"
}

link_loraplex() {  # loraplex's package-dir mapping (serve/ -> loraplex.serve, ...) without installing
  rm -rf "$WORK/lp" && mkdir -p "$WORK/lp/loraplex" && cp -r loraplex/. "$WORK/lp/loraplex/"
  for d in serve train eval loadtests; do ln -s "$PWD/$d" "$WORK/lp/loraplex/$d"; done
}

setup() {
  if [ ! -f "$SITE/.unpacked" ]; then
    say "unpacking $(ls /tmp/stage | tr '\n' ' ')"
    cat /tmp/stage/part* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$SITE', filter='tar')" || return 1
    touch "$SITE/.unpacked"
  fi
  link_loraplex
}

step_stage() {
  mkdir -p /tmp/stage && cp ".gpu-stage/part$1" /tmp/stage/ && say "staged part$1 ($(du -sh /tmp/stage | cut -f1) in all)"
}

step_check() {
  setup || return 1
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
  df -h /tmp | tail -1
  python3 - <<'EOF'
import importlib, sys
for name in ("torch", "vllm", "bitsandbytes", "trl", "peft", "transformers", "liger_kernel", "loraplex.cli",
             "loraplex.serve.app", "loraplex.train.trainer", "httpx", "pynvml", "prometheus_client"):
    try:
        module = importlib.import_module(name)
        print(f"{name:24s} {getattr(module, '__version__', '')}  {getattr(module, '__file__', '')}")
    except Exception as e:
        print(f"{name:24s} FAILED: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
}

step_prepare() {  # needs only the machine's own torch and transformers: can run before the parts are all there
  [ -d "$WORK/lp/loraplex/serve" ] || link_loraplex  # the adapters take their shapes from loraplex.serve
  local tok=()
  [ -d "$SITE/tok" ] && tok=(--tokenizer "$SITE/tok")
  say "preparing model and adapters"
  python3 benchmarks/gpu_serve.py prepare --model-dir "$MODEL" --registry "$REG" --new-dir "$NEW" "${tok[@]}" \
    --adapters "${ADAPTERS:-256}" --new-adapters 8 --shape "${SHAPE:-8b}"
}

step_serve_baseline() {
  setup || return 1
  stop_leftover_servers
  step_prepare || return 1
  say "loraplex serve, registry sizing"
  timeout "$(left)" python3 benchmarks/gpu_serve.py bench --server loraplex --model-dir "$MODEL" --registry "$REG" \
    --new-dir "$NEW" --cold --server-log "$OUT/server-loraplex.log" --out "$OUT/serve-loraplex.json" $BENCH_ARGS
  stop_leftover_servers
}

step_serve_compare() {
  setup || return 1
  stop_leftover_servers
  say "vLLM OpenAI server, same LoRA settings"
  timeout "$(( $(left) < 330 ? $(left) : 330 ))" python3 benchmarks/gpu_serve.py bench --server vllm --model-dir "$MODEL" --registry "$REG" \
    --new-dir "$NEW" --server-log "$OUT/server-vllm.log" --out "$OUT/serve-vllm.json" $BENCH_ARGS
  stop_leftover_servers
  say "loraplex serve --max-loras 256"
  timeout "$(left)" python3 benchmarks/gpu_serve.py bench --server loraplex --max-loras 256 \
    --label "loraplex --max-loras 256" --cases "$FEWER_CASES" --model-dir "$MODEL" \
    --registry "$REG" --new-dir "$NEW" --server-log "$OUT/server-loraplex-256.log" \
    --out "$OUT/serve-loraplex-maxloras256.json" $BENCH_ARGS
  stop_leftover_servers
}

step_serve_slots() {  # loraplex alone, with --max-loras $SLOTS and $SERVER_ARGS
  setup || return 1
  stop_leftover_servers
  step_prepare || return 1  # quick once done; adds the tokenizer to a model made before the parts were unpacked
  local slots=${SLOTS:-256} flags=(${SERVER_ARGS:-}) tag sizing
  sizing=(--max-loras "$slots")
  [ "$slots" = registry ] && sizing=()  # loraplex's own sizing for the registry on this GPU
  tag=$(echo "maxloras$slots${SERVER_ARGS:-}${RUN_TAG:+-$RUN_TAG}" | tr -c 'a-zA-Z0-9\n' '-' | tr -s '-')
  say "loraplex serve --max-loras $slots ${SERVER_ARGS:-} ${RUN_TAG:-}"
  timeout "$(left)" python3 benchmarks/gpu_serve.py bench --server loraplex "${sizing[@]}" \
    "${flags[@]/#/--server-arg=}" --label "loraplex --max-loras $slots${SERVER_ARGS:+ $SERVER_ARGS}${RUN_TAG:+ ($RUN_TAG)}" \
    --cases "${CASES:-$FEWER_CASES}" --model-dir "$MODEL" --registry "$REG" --new-dir "$NEW" \
    --server-log "$OUT/server-$tag.log" --out "$OUT/serve-loraplex-$tag.json" ${COLD:+--cold} $BENCH_ARGS
  stop_leftover_servers
}

step_serve_vllm() {
  setup || return 1
  stop_leftover_servers
  step_prepare || return 1
  local tag flags=(${SERVER_ARGS:-})
  tag=$(echo "vllm${SLOTS:+-maxloras$SLOTS}${RUN_TAG:+-$RUN_TAG}" | tr -c 'a-zA-Z0-9\n' '-' | tr -s '-')
  say "vLLM OpenAI server ${SLOTS:+--max-loras $SLOTS} ${SERVER_ARGS:-} ${RUN_TAG:-}"
  timeout "$(left)" python3 benchmarks/gpu_serve.py bench --server vllm ${SLOTS:+--max-loras "$SLOTS"} \
    "${flags[@]/#/--server-arg=}" --label "vLLM server${RUN_TAG:+ ($RUN_TAG)}" --cases "${CASES:-$FEWER_CASES}" \
    --model-dir "$MODEL" --registry "$REG" --new-dir "$NEW" --server-log "$OUT/server-$tag.log" \
    --out "$OUT/serve-$tag.json" ${PROFILE_CASES:+--profile-cases "$PROFILE_CASES" --profile-dir "$WORK/profiles"} \
    $BENCH_ARGS
  stop_leftover_servers
}

step_serve_pair() {
  setup || return 1
  stop_leftover_servers
  step_prepare || return 1
  local tag flags=(${SERVER_ARGS:-} --gpu-memory-utilization "${PAIR_GPU_SHARE:-0.45}")
  tag=$(echo "pair${SLOTS:+-maxloras$SLOTS}${RUN_TAG:+-$RUN_TAG}" | tr -c 'a-zA-Z0-9\n' '-' | tr -s '-')
  say "loraplex and vLLM's server on one GPU, bursts alternating ${SLOTS:+--max-loras $SLOTS} ${RUN_TAG:-}"
  timeout "$(left)" python3 benchmarks/gpu_serve.py bench --server pair --repeats "${REPEATS:-3}" \
    ${SLOTS:+--max-loras "$SLOTS"} "${flags[@]/#/--server-arg=}" --cases "${CASES:-$FEWER_CASES}" \
    --model-dir "$MODEL" --registry "$REG" --new-dir "$NEW" --server-log "$OUT/server-$tag.log" \
    --out "$OUT/serve-$tag.json" $BENCH_ARGS
  stop_leftover_servers
}

step_tune_lora() {
  setup || return 1
  step_prepare || return 1
  say "tuning LoRA kernels for ${SLOTS:-16} slots into $LORA_CONFIGS"
  timeout "$(left)" env -u VLLM_TUNED_CONFIG_FOLDER python3 -m loraplex tune-lora-kernels --base-model "$MODEL" \
    --max-loras "${SLOTS:-16}" --time-budget "${TUNE_BUDGET_S:-300}" --passes "${TUNE_PASSES:-1}" \
    ${TUNE_BATCHES:+--batches "$TUNE_BATCHES"} --out "$LORA_CONFIGS" 2>&1 | grep -v -i "warn" | tail -60
  cp "$LORA_CONFIGS"/*.json "$OUT"/ 2>/dev/null
  return 0
}

step_grid_bench() {
  setup || return 1
  say "LoRA kernels: vLLM's grid against the compact grid"
  timeout "$(left)" python3 benchmarks/gpu_lora_grid.py --out "$OUT/lora-grid.json" ${GRID_ARGS:-} 2>&1 | grep -v -i "warn"
}

step_lora_load() {
  setup || return 1
  step_prepare || return 1  # a model prepared before the parts were unpacked lacks its tokenizer, which vLLM needs
  say "loading one adapter: read, vLLM's load, pinning, copy to the GPU; then add_adapter's parts in an engine"
  timeout "$(left)" python3 benchmarks/gpu_lora_load.py --registry "$REG" --model-dir "$MODEL" --slots "${SLOTS:-16}" \
    --preload "${PRELOAD:-128}" ${LORA_LOAD_ONLY:+--only "$LORA_LOAD_ONLY"} --out "$OUT/lora-load.json" 2>&1 | grep -v -i "warn" | tail -40
}

step_detach() {
  mkdir -p "$KEEP" && rm -f "$KEEP/detached.done"
  # not this command's RUN_LIMIT_S: a detached server outlives the command (a cold first start alone takes ~430 s)
  RUN_LIMIT_S=${DETACHED_LIMIT_S:-1500} KEEP=$KEEP OUT=$KEEP setsid nohup bash -c 'bash "$0" "$@"; touch "$KEEP/detached.done"' "$0" "$@" \
    >> "$KEEP/detached.log" 2>&1 < /dev/null &
  say "detached: $* (log $KEEP/detached.log)"
}

step_wait() {
  local until=$(( $(date +%s) + $1 ))
  while [ -f "$KEEP/detached.log" ] && [ ! -f "$KEEP/detached.done" ] && [ "$(date +%s)" -lt "$until" ]; do
    sleep 5
  done
  if [ -f "$KEEP/detached.done" ]; then say "detached steps finished"; else say "detached steps still running"; fi
  [ -d "$KEEP" ] || return 0
  tail -n 30 "$KEEP/detached.log"
  cp "$KEEP"/*.json "$KEEP"/profile-*.txt "$OUT"/ 2>/dev/null
  # the results come back whole; of the logs only their ends (a machine gives back few files), and loraplex's
  # own lines (engine settings, warm-up, adapter loads, pinned reserve, its worker patches) from the whole log
  (cd "$KEEP" && for f in *.log; do
     { grep -E "loraplex\.serve|vllm\.loraplex|LoRA (kernels|adapters):" "$f" | grep -v "POST " | head -n 600
       echo "--- tail"
       tail -n 400 "$f"; } > "/tmp/tail-$f"; done
   tar -czf "$OUT/logs.tgz" -C /tmp $(cd /tmp && ls tail-*.log))
}

step_train() {
  setup || return 1
  stop_leftover_servers
  rm -rf "$REG" "$NEW"  # the serving adapters: disk for the trained ones
  python3 benchmarks/gpu_serve.py prepare --model-dir "$MODEL" --registry "$WORK/empty" --new-dir "$WORK/empty" \
    --tokenizer "$SITE/tok" --adapters 0 --new-adapters 0 || return 1
  python3 benchmarks/gpu_train.py data --tokenizer "$SITE/tok" --out "$WORK/train.jsonl" || return 1
  for recipe in ${RECIPES:-standard loraplex loraplex-liger loraplex-bs2x4 loraplex-packing}; do
    if [ "$(left)" -lt 100 ]; then say "skipping $recipe: out of time"; continue; fi
    say "recipe $recipe"
    timeout "$(( $(left) < 300 ? $(left) : 300 ))" python3 benchmarks/gpu_train.py run --recipe "$recipe" --model-dir "$MODEL" --data "$WORK/train.jsonl" \
      --workdir "$WORK/train" --out "$OUT/train-$recipe.json" 2>&1 | grep -v -i "warn" | tail -25
  done
  python3 benchmarks/gpu_train.py merge --out "$OUT/train.json" "$OUT"/train-*.json
}

while [ $# -gt 0 ]; do
  step=$1; shift
  case $step in
    stage) step_stage "$1"; shift ;;
    check) step_check 2>&1 | tee -a "$OUT/check.log" ;;
    prepare) step_prepare 2>&1 | tee -a "$OUT/prepare.log" ;;
    serve-baseline) step_serve_baseline 2>&1 | tee -a "$OUT/serve-baseline.log" ;;
    serve-compare) step_serve_compare 2>&1 | tee -a "$OUT/serve-compare.log" ;;
    serve-slots) step_serve_slots 2>&1 | tee -a "$OUT/serve-slots.log" ;;
    serve-vllm) step_serve_vllm 2>&1 | tee -a "$OUT/serve-vllm.log" ;;
    tune-lora) step_tune_lora 2>&1 | tee -a "$OUT/tune-lora.log" ;;
    serve-pair) step_serve_pair 2>&1 | tee -a "$OUT/serve-pair.log" ;;
    grid-bench) step_grid_bench 2>&1 | tee -a "$OUT/grid-bench.log" ;;
    lora-load) step_lora_load 2>&1 | tee -a "$OUT/lora-load.log" ;;
    train) step_train 2>&1 | tee -a "$OUT/train.log" ;;
    detach) step_detach "$@"; exit 0 ;;
    wait) step_wait "$1"; shift ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
say "done"
