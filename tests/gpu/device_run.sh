#!/usr/bin/env bash
# On the lent GPU machine (no package index): install the wheels that travelled with the working
# tree, then run the GPU check (python -m tests.gpu.check). See docs/gpu.md for the whole recipe.
#
#   bash tests/gpu/device_run.sh WHEEL_DIR... [-- CHECK_ARGS]
#
# Each WHEEL_DIR holds wheels (*.whl) and/or the parts of one that was too big for one transfer
# (NAME.whl.part-aa, NAME.whl.part-ab, ...: `split -b 45M NAME.whl NAME.whl.part-`); the parts are
# joined back first. Everything is installed with --no-deps into a folder of its own that goes first
# on PYTHONPATH, so it wins over the machine's own packages (its onnxruntime is the CPU build).
set -euo pipefail
cd "$(dirname "$0")/../.."
site=${TANDEM_GPU_SITE:-/tmp/tandem-gpu-site}
dirs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do dirs+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#dirs[@]} -gt 0 ] || { echo "usage: $0 WHEEL_DIR... [-- CHECK_ARGS]" >&2; exit 2; }

wheels=()
for d in "${dirs[@]}"; do
  for first in "$d"/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whole=${first%.part-aa}
    cat "$whole".part-* > "$whole.joined"
    mv "$whole.joined" "$whole"
    echo "device_run: joined $(basename "$whole") from $(ls "$whole".part-* | wc -l) parts"
  done
  for w in "$d"/*.whl; do [ -e "$w" ] && wheels+=("$w"); done
done
[ ${#wheels[@]} -gt 0 ] || { echo "device_run: no wheels in ${dirs[*]}" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "${wheels[@]}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# onnxruntime-gpu finds the CUDA and cuDNN libraries of NVIDIA's pip packages (already on the
# machine) only when asked to; the stages do the same when TANDEM_PROVIDER=cuda
python3 -c "import onnxruntime as o; o.preload_dlls(); print('device_run: onnxruntime', o.__version__, o.get_available_providers())"
exec python3 -m tests.gpu.check "$@"
