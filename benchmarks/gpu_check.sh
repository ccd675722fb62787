#!/usr/bin/env bash
# The CUDA checks of femeta, for a GPU machine without DOLFINx (run from the repository root).
#
# The datasets come along from femeta's cache, xz-compressed. Prepare them on a
# machine with DOLFINx (femeta installed), in the repository root:
#   python -c "from femeta.problems.elasticity import ElasticBeam as B; b = B(); b.stored_pattern(); [b.split(s, 0) for s in ('train', 'validation', 'test')]"
#   mkdir -p .devdata && for f in ~/.cache/femeta/elasticity-*.safetensors; do xz -9 -c $f > .devdata/$(basename $f).xz; done
# There: OUT=DIR bash benchmarks/gpu_check.sh (the log and the run directory land in DIR).
# TOTAL_S bounds the whole; training gets what the other parts leave.
set -u
export PYTHONPATH=$PWD XDG_CACHE_HOME=/tmp/cache PYTHONUNBUFFERED=1
mkdir -p /tmp/cache/femeta "$OUT"
python3 -c "
import lzma, pathlib
for f in pathlib.Path('.devdata').glob('*.xz'):
    (pathlib.Path('/tmp/cache/femeta') / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
"
T0=$(date +%s); END=$((T0 + ${TOTAL_S:-560}))
stamp() { echo "== +$(( $(date +%s) - T0 )) s: $*"; }
left() { local s=$(( END - $(date +%s) - $1 )); echo $(( s > 10 ? s : 10 )); }
{
stamp start; nvidia-smi -L; nproc; python3 -c "import torch, numpy, scipy; print(torch.__version__, numpy.__version__, scipy.__version__)"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_iccg.py tests/test_jacobi.py tests/test_newton_sor.py tests/test_workflow.py -k cuda 2>&1 | tail -15
stamp pytest done
for b in base best; do timeout 75 python3 -m femeta evaluate elasticity --baseline $b --ic-pattern stored --device cuda --json; echo; stamp "baseline $b done"; done
# Trained on the GPU, evaluated there and on the CPU.
timeout 60 python3 -m femeta train robertson --sets 8 --epochs 2 --device cuda --out /tmp/rob
for d in cuda cpu; do timeout 30 python3 -m femeta evaluate robertson --model /tmp/rob --sets 8 --device $d --json; echo; done
timeout 45 python3 -m femeta train poisson1d --epochs 100 --device cuda --out /tmp/poi
for d in cuda cpu; do timeout 20 python3 -m femeta evaluate poisson1d --model /tmp/poi --device $d --json; echo; done
stamp "robertson and poisson1d done"
timeout "$(left 330)" python3 benchmarks/bench_iccg_devices.py --ic-pattern stored --repeats 3 --cpu-repeats 1
stamp bench done
timeout -s INT "$(left 50)" python3 -m femeta train elasticity --paper --ic-pattern stored --device cuda --out /tmp/run; echo "train rc $?"
stamp trained
if [ -f /tmp/run/model.safetensors ]; then
  for d in cuda cpu; do timeout "$(left 5)" python3 -m femeta evaluate elasticity --model /tmp/run --device $d --json; echo; stamp "eval $d done"; done
fi
tar czf "$OUT/run.tgz" -C /tmp run
stamp end
} 2>&1 | tee "$OUT/device.log"
