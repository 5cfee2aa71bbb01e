#!/usr/bin/env bash
# One device call that checks the package where it deploys (torch 2.11, triton 3.6, transformers 5.17 on the H200):
# the Triton kernels compile for sm_90 and match their references on CUDA, the CUDA registrations load, the
# import graph and registry hold, the attention-semantics probe reads the same windows / ALiBi there, and the
# attention kernels still time against SDPA / FlexAttention (4K, 16K).
#   bash benchmarks/h200_check.sh      (results in $OUT, default ./out; CHECK_ONLY=1 skips the timings)
# AOTI_ONLY=1 instead checks the deployable compiled forms (issue 13 items 3-4): the AOTInductor package tests on
# torch 2.11, MiniLM packages compiled for CUDA and for the CPU (eager vs package latency, each package checked
# against its program within 1e-4); AOTI_ALL=1 adds the CPU package tests, CPU packages and the two ONNX targets.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks
python -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'gpus', torch.cuda.device_count())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
git log -1 --format="commit %H" 2>/dev/null || true
if [ -n "${AOTI_ONLY:-}" ]; then
  # AOTInductor itself, no rewriter: on torch 2.11+cu130 there, loading any package segfaulted. Compile, load and
  # run in separate steps (faulthandler's stack for a crash), the package's shared objects' links, a gdb backtrace
  g++ --version | head -1; python -c "import torch; print('cxx11 abi', torch.compiled_with_cxx11_abi(), 'cuda', torch.version.cuda)"
  for d in ${AOTI_DEVICES:-cpu cuda}; do     # AOTI_QUICK=1: the plain load and the codecache import only
    log="$OUT/aoti_smoke_$d.log"
    timeout 120 python benchmarks/aoti_smoke.py --device $d --package /tmp/aoti_$d.pt2 --compile-only > "$log" 2>&1
    echo "aoti smoke $d compile rc=$?"
    timeout 60 python -X faulthandler benchmarks/aoti_smoke.py --device $d --package /tmp/aoti_$d.pt2 --load-only >> "$log" 2>&1
    echo "aoti smoke $d load+run rc=$?"
    [ -z "${AOTI_QUICK:-}" ] && { timeout 60 python -X faulthandler benchmarks/aoti_smoke.py --device $d \
      --package /tmp/aoti_$d.pt2 --load-only --single-threaded >> "$log" 2>&1
      echo "aoti smoke $d load+run single-threaded rc=$?"; }
    timeout 60 python -X faulthandler benchmarks/aoti_smoke.py --device $d --package /tmp/aoti_$d.pt2 --load-only \
      --import-codecache >> "$log" 2>&1    # pytorch/pytorch#173706; a hang prints its stacks after 45 s
    echo "aoti smoke $d load+run with codecache imported rc=$?"
    TORCHINDUCTOR_COMPILE_THREADS=1 timeout 60 python -X faulthandler benchmarks/aoti_smoke.py --device $d \
      --package /tmp/aoti_$d.pt2 --load-only >> "$log" 2>&1     # no compile worker pool in the loading process
    echo "aoti smoke $d load+run with one compile thread rc=$?"
    TORCHINDUCTOR_VEC_ISA_OK=0 timeout 60 python -X faulthandler benchmarks/aoti_smoke.py --device $d \
      --package /tmp/aoti_$d.pt2 --load-only >> "$log" 2>&1     # no g++ vector-ISA probe (it took > 45 s on the H100)
    echo "aoti smoke $d load+run without the vector-ISA probe rc=$?"; grep -v Warning "$log" | tail -60
    rm -rf /tmp/aoti_x && mkdir -p /tmp/aoti_x && (cd /tmp/aoti_x && python -m zipfile -e /tmp/aoti_$d.pt2 . && \
      find . -name "*.so" | while read f; do echo "== $f"; ldd "$f"; done) >> "$OUT/aoti_ldd.log" 2>&1
  done
  # the crash's native stack: there is no gdb on the device, cuda-gdb debugs host-only code as well
  GDB=$(command -v gdb || command -v cuda-gdb)
  if [ -n "$GDB" ] && [ -f /tmp/aoti_${AOTI_GDB_DEVICE:-cuda}.pt2 ]; then
    TORCHINDUCTOR_VEC_ISA_OK=0 timeout 150 "$GDB" -batch -ex run -ex bt -ex "info sharedlibrary" --args python \
      benchmarks/aoti_smoke.py --device ${AOTI_GDB_DEVICE:-cuda} --package /tmp/aoti_${AOTI_GDB_DEVICE:-cuda}.pt2 \
      --load-only > "$OUT/aoti_gdb.log" 2>&1
    echo "$GDB rc=$?"; grep -B2 -A30 "SIGSEGV\|signal SIG" "$OUT/aoti_gdb.log" | head -50
  else echo "no gdb / cuda-gdb or no package"; fi
  [ -n "${AOTI_QUICK:-}" ] && exit 0
  tail -30 "$OUT/aoti_ldd.log"
  timeout 240 python benchmarks/aoti_cpu.py --device cuda --repeats 20 --out "$OUT/aoti_cuda.json" > "$OUT/aoti_cuda.log" 2>&1
  echo "aoti cuda rc=$?"; grep -v Warning "$OUT/aoti_cuda.log" | tail -12
  if [ -n "${AOTI_ALL:-}" ]; then   # the CPU package tests and the CPU / ONNX comparisons on that machine too
    timeout 200 python -m pytest -q -o addopts=-ra -p no:cacheprovider tests/test_compile.py > "$OUT/pytest_compile.log" 2>&1
    echo "pytest compile rc=$?"; tail -4 "$OUT/pytest_compile.log"
    timeout 120 taskset -c 0,1 python benchmarks/aoti_cpu.py --device cpu --threads 2 --repeats 10 \
      --out "$OUT/aoti_cpu.json" > "$OUT/aoti_cpu.log" 2>&1
    echo "aoti cpu rc=$?"; grep "variant\|Error" "$OUT/aoti_cpu.log" | tail -6
    timeout 120 taskset -c 0,1 python benchmarks/onnx_cpu.py --targets --threads 2 --repeats 20 > "$OUT/onnx_targets.log" 2>&1
    echo "onnx targets rc=$?"; grep "variant\|Error" "$OUT/onnx_targets.log" | tail -10
    cp benchmarks/results/onnx_cpu_targets.json "$OUT/" 2>/dev/null
  fi
  exit 0
fi
timeout 280 python -m pytest -q -o addopts=-ra -p no:cacheprovider tests/test_kernels_compile.py tests/test_ops_lowrank_attention.py \
  tests/test_import_graph.py tests/test_attention_registry.py tests/test_semantics.py tests/test_exact_attention.py \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -8 "$OUT/pytest.log"
[ -n "${CHECK_ONLY:-}" ] && exit 0
timeout 200 python benchmarks/attention.py --lengths 4096 16384 --budget-s 150 --out "$OUT/attention_h200_check.json" \
  > "$OUT/attention.log" 2>&1
echo "attention rc=$?"; tail -25 "$OUT/attention.log"
