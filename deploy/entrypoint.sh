#!/usr/bin/env bash
# The containers' entrypoint: `loraplex serve` with its flags taken from LORAPLEX_* environment variables.
#
#   LORAPLEX_MAX_LORAS=8        ->  --max-loras 8        (every name in VALUE_FLAGS, upper-cased, - as _)
#   LORAPLEX_ENFORCE_EAGER=1    ->  --enforce-eager      (every name in SWITCH_FLAGS; 1, true or yes)
#   LORAPLEX_SPECIALIZE_ACTIVE_LORA=0 -> --no-specialize-active-lora (ON_OFF_FLAGS: 1/true/yes on, 0/false/no off)
#
# Unset or empty variables are left out, so loraplex's own defaults apply. API keys are no flags: loraplex
# reads LORAPLEX_API_KEYS (comma-separated) and LORAPLEX_ADMIN_KEY itself, so they never appear in `ps`.
# Arguments are passed on after the flags; a leading `serve` (SageMaker starts images with it) is dropped.
set -euo pipefail

VALUE_FLAGS="base-model adapters-dir host port platform aliases allowed-adapter-root max-loras max-cpu-loras
  max-lora-rank max-model-len max-num-seqs max-queue max-request-bytes default-max-tokens max-tokens-limit
  scan-interval dtype seed tensor-parallel-size pipeline-parallel-size distributed-executor-backend
  gpu-memory-utilization kv-cache-gb lora-kernel-configs pinned-reserve-gb event-loop"
SWITCH_FLAGS="enforce-eager log-requests"
ON_OFF_FLAGS="specialize-active-lora compact-lora-grid warmup"

if [[ "${1:-}" == "serve" ]]; then
  shift
fi

args=()
for flag in $VALUE_FLAGS; do
  var="LORAPLEX_${flag//-/_}"
  var="${var^^}"
  if [[ -n "${!var:-}" ]]; then
    args+=("--$flag" "${!var}")
  fi
done
for flag in $SWITCH_FLAGS $ON_OFF_FLAGS; do
  var="LORAPLEX_${flag//-/_}"
  var="${var^^}"
  case "${!var:-}" in
    1 | true | yes) args+=("--$flag") ;;
    0 | false | no) if [[ " $ON_OFF_FLAGS " == *" $flag "* ]]; then args+=("--no-$flag"); fi ;;
  esac
done

exec loraplex serve "${args[@]}" "$@"
