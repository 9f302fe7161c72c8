#!/usr/bin/env bash
# Every GPU check of the "GPU copies" issue in one run, for a machine with an NVIDIA GPU, torch with
# CUDA and nvidia-ml-py (results in $OUT, else benchmarks/results). Beam's peer needs apache-beam:
# carried wheels in .whl/ are installed first where present (see benchmarks/RESULTS.md, "GPU").
# Each step has its own time limit (about 8 minutes in all), so a hang costs one step, not the run.
#   bash benchmarks/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
python3 -c "import torch, pynvml; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -c "import apache_beam.utils.multi_process_shared as m; print('beam', m.__name__)" 2>&1 | tail -1
timeout 90 python3 -m benchmarks.gpu.probe 2>&1 | tee "$out/gpu-probe.json"
timeout 210 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu tests/codecs/test_torch.py 2>&1 | tee "$out/gpu-tests.log"
timeout 180 python3 -m benchmarks.gpu --out "$out" 2>&1 | tee "$out/gpu-bench.log"
