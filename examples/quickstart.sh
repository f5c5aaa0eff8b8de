#!/usr/bin/env bash
# Install lemoe-peft (into .venv), edit 100 ZsRE facts into SmolLM2-135M-Instruct on the CPU, print Rel/Gen/Loc.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
lemoe edit --model smollm2 \
    --data ../shared/data/zsre/zsre_mend_train-1k.json --limit 100 \
    --out runs/zsre-smollm2 --json runs/zsre-smollm2.json "$@"
