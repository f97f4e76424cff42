#!/usr/bin/env bash
# N processes of pjit_llm.train on this machine, joined on a free local port.
#   launch/local.sh 2 --emulate-devices 4 -- mesh.data=2 mesh.fsdp=2 mesh.tensor=2   (CPU)
#   launch/local.sh 8 --one-gpu-each -- --config configs/tiny.yaml mesh.fsdp=-1      (8 GPUs)
set -euo pipefail
processes=${1:?usage: launch/local.sh N [--emulate-devices D | --one-gpu-each] -- TRAIN_ARGS}
shift
exec python -m pjit_llm.launch --processes "$processes" "$@"
