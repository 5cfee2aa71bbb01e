#!/usr/bin/env bash
# The H200 runs behind benchmarks/results/*_h200*.json, batched for the device tool (each call <= 10 minutes):
#   bash benchmarks/h200.sh kernels   # binary GEMV sweep + attention kernels vs SDPA / FlexAttention / fla
#   bash benchmarks/h200.sh models    # 1.1B Llama prefill (16K, 32K) + KV-cache decode (4K, 16K, 32K)
#   bash benchmarks/h200.sh forms     # 1.1B prefill of captured + window as eager program, HF folder, AOTI package
#   bash benchmarks/h200.sh compiled  # the same programs compiled by Inductor (torch.compile), and transformers so
#   bash benchmarks/h200.sh fused     # 1.1B prefill (32K, 16K), eager programs: window, window + fuse, fuse alone
#   bash benchmarks/h200.sh issue13   # fuse kernels; 32K eager window / + fuse / fuse, captured + window compiled
#   bash benchmarks/h200.sh attention # window / linear / Scatterbrain kernels at 16K-64K vs FlexAttention, fla, SDPA
#   bash benchmarks/h200.sh exact     # exact attention on the band kernel (exact_triton) vs SDPA, config sweep
#   bash benchmarks/h200.sh band      # the band (window) kernel's config sweep, Scatterbrain, binary GEMV sweep
#   bash benchmarks/h200.sh decode    # KV decode, batch 1, every KV pass (decode-batch: batches 1 / 8 / 32;
#                                     # decode-fused: every pass at 32K with the Inductor-fused step;
#                                     # decode-mla: the MLA step's decode-attention split sweep;
#                                     # decode-gemv: the step's gemv kernels swept, then decode with them;
#                                     # decode-passes (= decode-pdl): no pass without PDL, then no pass, kv-window,
#                                     #   think and mla with it; decode-mla-up: mla with / without its
#                                     #   fused query product and its up-projection in the decode reduce;
#                                     # decode-attn: decode attention tiles swept, then mla / original decode)
#   bash benchmarks/h200.sh ncu       # Nsight Compute counters of the decode, binary GEMV and band kernels
#   bash benchmarks/h200.sh pending   # the untimed changes of 12-07 (evening): partials, fused up, ncu (and
#                                     # pending-linear: the nibble-table binary GEMV)
# Results go to $OUT (default ./out). fla-core comes from a wheel carried in .gpu_kernels2/.whl (no network there):
#   pip download fla-core==0.6.0 --no-deps -d .gpu_kernels2/.whl   (then carry .gpu_kernels2/.whl with the run)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks
python -m pip install -q --no-deps .gpu_kernels2/.whl/*.whl 2>/dev/null && python -c "import fla" || echo "fla-core not importable: fla peers skipped"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
git log -1 --format="commit %H" 2>/dev/null || true
case "${1:-}" in
kernels)
  timeout 170 python benchmarks/linear.py --binary-only --out "$OUT/linear_h200_v4_splitk.json" > "$OUT/linear.log" 2>&1
  echo "linear rc=$?"; tail -5 "$OUT/linear.log"
  timeout 380 python benchmarks/attention.py --budget-s 330 --out "$OUT/attention_h200_v3.json" > "$OUT/attention.log" 2>&1
  echo "attention rc=$?"; tail -5 "$OUT/attention.log";;
models)
  timeout 250 python benchmarks/prefill.py --out "$OUT/prefill_h200.json" > "$OUT/prefill.log" 2>&1
  echo "prefill rc=$?"; tail -12 "$OUT/prefill.log"
  timeout 320 python benchmarks/kv.py --out "$OUT/kv_h200.json" ${KV_VARIANTS:+--variants $KV_VARIANTS} > "$OUT/kv.log" 2>&1
  echo "kv rc=$?"; tail -3 "$OUT/kv.log";;
forms)   # issue 13: every deployable form (eager program, HF folder in transformers, AOTInductor package)
  timeout 560 python benchmarks/prefill.py --forms eager hf aoti --variants window --workdir /tmp/prefill_outputs \
    --out "$OUT/prefill_h200_forms.json" > "$OUT/prefill_forms.log" 2>&1
  echo "prefill forms rc=$?"; grep '"form"' "$OUT/prefill_forms.log" | tail -12;;
compiled)   # issue 13: the program compiled by Inductor (what an AOTI package holds; aoti_load_package cannot load
            # on that machine's torch 2.11) beside the eager program and transformers, eager and compiled
  TORCHINDUCTOR_COMPILE_THREADS=1 timeout 570 python benchmarks/prefill.py --forms eager compiled --variants window \
    --lengths ${PREFILL_LENGTHS:-32768 16384} \
    --out "$OUT/prefill_${PREFILL_TAG:-h200_compiled}.json" > "$OUT/prefill_compiled.log" 2>&1
  echo "prefill compiled rc=$?"; grep -v Warning "$OUT/prefill_compiled.log" | grep '"form"\|diff\|Error' | tail -16;;
fused)   # issue 13: the fuse pass (RMSNorm, SwiGLU's silu * up: one Triton kernel each): its kernels against the
         # model's own ops (eager and compiled), then the eager programs
  timeout 80 python benchmarks/fused_kernels.py --out "$OUT/fused_kernels_${PREFILL_TAG:-h200}.json" \
    > "$OUT/fused_kernels.log" 2>&1
  echo "fused kernels rc=$?"; tail -8 "$OUT/fused_kernels.log"
  timeout 460 python benchmarks/prefill.py --forms eager --variants window window_fused fused \
    --lengths ${PREFILL_LENGTHS:-32768 16384} --out "$OUT/prefill_${PREFILL_TAG:-h200}_fused.json" \
    > "$OUT/prefill_fused.log" 2>&1
  echo "prefill fused rc=$?"; grep '"form"\|Error' "$OUT/prefill_fused.log" | tail -12;;
issue13)   # issue 13 in one call: the fuse kernels, then at 32K the eager programs (captured, window, window + fuse,
           # fuse alone), window + fuse as its HF folder in transformers, and the compiled captured and window
           # programs (transformers compiled: earlier runs)
  timeout 60 python benchmarks/fused_kernels.py --out "$OUT/fused_kernels_${PREFILL_TAG:-h200}.json" \
    > "$OUT/fused_kernels.log" 2>&1
  echo "fused kernels rc=$?"; tail -8 "$OUT/fused_kernels.log"
  TORCHINDUCTOR_COMPILE_THREADS=1 timeout 500 python benchmarks/prefill.py --forms eager compiled hf \
    --variants window window_fused fused --compiled-variants captured window --hf-variants window_fused \
    --no-transformers-compiled ${PREFILL_PROFILE:+--profile --trace-dir $OUT/traces} \
    --lengths ${PREFILL_LENGTHS:-32768} --out "$OUT/prefill_${PREFILL_TAG:-h200}_issue13.json" \
    > "$OUT/prefill_issue13.log" 2>&1
  echo "prefill rc=$?"; grep -v Warning "$OUT/prefill_issue13.log" | grep '"form"\|diff\|Error\|^profile\|^  gap\|^  sync' | tail -60;;
attention)   # issue 19: window (tuned configs, GQA), linear (chunk-parallel, GQA), Scatterbrain, at 16K-64K
  timeout ${ATTN_TIMEOUT:-420} python benchmarks/attention.py --lengths ${ATTN_LENGTHS:-16384 32768 65536} \
    --budget-s ${ATTN_BUDGET:-360} --out "$OUT/attention_h200_v4.json" > "$OUT/attention.log" 2>&1
  echo "attention rc=$?"; grep -E "^(window|linear|scatterbrain) " "$OUT/attention.log" | cut -c1-400;;
exact)   # issue 13 / 19: exact attention on the band kernel with no band (compiled programs' exact_triton), a
         # config / heads sweep against SDPA cuDNN and flash, all-ones and left-padded masks (the eager op's SDPA path)
  timeout ${ATTN_TIMEOUT:-330} python benchmarks/attention.py --ops exact --lengths ${ATTN_LENGTHS:-32768 16384} \
    --dims 64 128 --budget-s ${ATTN_BUDGET:-270} --out "$OUT/attention_exact_${ATTN_TAG:-h200}.json" \
    > "$OUT/attention_exact.log" 2>&1
  echo "attention exact rc=$?"; grep -E "^exact " "$OUT/attention_exact.log" | cut -c1-600;;
band)   # issue 19: the band (window) kernel's config sweep + Scatterbrain on it, then the binary GEMV sweep
  timeout 400 python benchmarks/attention.py --lengths ${ATTN_LENGTHS:-32768 65536 16384} \
    --ops ${ATTN_OPS:-window scatterbrain} --budget-s ${ATTN_BUDGET:-330} \
    --out "$OUT/attention_h200_${ATTN_TAG:-v5}.json" > "$OUT/attention.log" 2>&1
  echo "attention rc=$?"; grep -E "^(window|linear|scatterbrain) " "$OUT/attention.log" | cut -c1-900
  timeout 150 python benchmarks/linear.py --binary-only --out "$OUT/linear_h200_${ATTN_TAG:-v5}.json" \
    > "$OUT/linear.log" 2>&1
  echo "linear rc=$?"; tail -5 "$OUT/linear.log";;
decode)   # issue 14: batch 1 at 4K / 32K with every KV pass, the SDPA and Inductor steps beside the kernel's
  timeout 560 python benchmarks/kv.py --out "$OUT/kv_h200.json" --contexts 4096 32768 \
    --variants original kv-window4+1020 think0.5 mla-decoupled0.5 think-dynamic0.5 --sdpa-variants original \
    --compile-variants original --compile-contexts 4096 --static-peer-contexts 4096 --static-budget-s 300 \
    --unfused-variants original --profile-steps ${KV_PROFILE_STEPS:-4} \
    > "$OUT/kv.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv.log" | cut -c1-300;;
decode-gemv)   # issue 14: the decode step's gemv kernels swept against cuBLAS (best launches to $OUT/gemv_configs.json),
               # then batch-1 decode with those launches, the same step on cuBLAS (_cublas) and with the captured ops
  timeout 200 python benchmarks/gemv.py --out "$OUT/gemv_${KV_TAG:-h200}.json" --configs-out "$OUT/gemv_configs.json" \
    --budget-s ${GEMV_BUDGET:-160} > "$OUT/gemv.log" 2>&1
  echo "gemv rc=$?"; grep -v Warning "$OUT/gemv.log" | tail -12
  timeout 370 python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_gemv.json" --contexts 4096 32768 \
    --variants original kv-window4+1020 think0.5 mla-decoupled0.5 --cublas-variants original \
    --unfused-variants original --static-peer-contexts --profile-steps ${KV_PROFILE_STEPS:-4} --budget-s 330 \
    $( [ -f "$OUT/gemv_configs.json" ] && echo --gemv-configs "$OUT/gemv_configs.json" ) > "$OUT/kv_gemv.log" 2>&1
  echo "kv rc=$?"; grep '^{\|^gemv configs' "$OUT/kv_gemv.log" | cut -c1-300;;
decode-passes|decode-pdl)   # issue 14: batch 1 at 4K / 32K: the unthinned step with REWRITER_PDL=0 (no programmatic
              # dependent launch), then the unthinned step beside kv-window, think and mla with it (the 32K ratios)
  REWRITER_PDL=0 timeout 120 python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_nopdl.json" --contexts 4096 32768 \
    --variants original --static-peer-contexts --profile-steps 2 --budget-s 100 > "$OUT/kv_nopdl.log" 2>&1
  echo "kv no pdl rc=$?"; grep '^{' "$OUT/kv_nopdl.log" | cut -c1-240
  timeout ${KV_TIMEOUT:-400} python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_passes.json" --contexts 4096 32768 \
    --variants ${KV_PASS_VARIANTS:-original kv-window4+1020 think0.5 mla-decoupled0.5} --static-peer-contexts --profile-steps 2 \
    --budget-s $(( ${KV_TIMEOUT:-400} - 40 )) > "$OUT/kv_passes.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_passes.log" | cut -c1-240;;
decode-mla-up)   # issue 14: the unthinned and the absorbed mla step as they are (32K first), then the mla step with
                 # its query product on cuBLAS + rotary (REWRITER_DECODE_MATMUL_ROTARY=0; default: one kernel) and
                 # with its value up-projection after the attention (REWRITER_DECODE_FUSED_UP=0; default: in the
                 # decode reduce)
  timeout 200 python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_mla_up.json" --contexts 32768 4096 \
    --variants original mla-decoupled0.5 --profile-steps 2 --budget-s 180 > "$OUT/kv_mla_up.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_mla_up.log" | cut -c1-240
  for ab in REWRITER_DECODE_MATMUL_ROTARY REWRITER_DECODE_FUSED_UP; do
    env $ab=0 timeout 110 python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_mla_${ab#REWRITER_DECODE_}0.json" \
      --contexts 32768 4096 --variants mla-decoupled0.5 --profile-steps 2 --budget-s 95 > "$OUT/kv_mla_$ab.log" 2>&1
    echo "kv $ab=0 rc=$?"; grep '^{' "$OUT/kv_mla_$ab.log" | cut -c1-240
  done;;
decode-mla)   # issue 14: the latent MLA step's split-K attention with larger partial shares (more programs)
  timeout ${KV_TIMEOUT:-560} python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_mla.json" --contexts 4096 32768 \
    --variants ${KV_MLA_VARIANTS:-original mla-decoupled0.5} --split-sweep-variants mla-decoupled0.5 \
    --partial-shares 1 4 16 --static-peer-contexts --profile-steps 4 > "$OUT/kv_mla.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_mla.log" | cut -c1-300;;
decode-attn)   # issue 14: the decode attention's tiles and split swept at the unthinned (gqa) and absorbed mla cache
               # forms, then batch-1 decode of both with the default and the fastest launch (<variant>_tuned)
  timeout 180 python benchmarks/decode_attention.py --out "$OUT/decode_attention_${KV_TAG:-h200}.json" --contexts ${KV_CONTEXTS:-4096 32768} \
    --budget-s ${ATTN_BUDGET:-150} > "$OUT/decode_attention.log" 2>&1
  echo "attn rc=$?"; grep '^best' "$OUT/decode_attention.log"; grep -c '^{' "$OUT/decode_attention.log"
  tiles="$OUT/decode_attention_${KV_TAG:-h200}.json"
  timeout ${KV_TIMEOUT:-360} python benchmarks/kv.py --out "$OUT/kv_${KV_TAG:-h200}_mla.json" --contexts ${KV_CONTEXTS:-4096 32768} \
    --variants original mla-decoupled0.5 --tile-variants original mla-decoupled0.5 --profile-steps 4 --budget-s $(( ${KV_TIMEOUT:-360} - 40 )) \
    $( [ -f "$tiles" ] && echo --tiles-from "$tiles" ) \
    > "$OUT/kv_mla.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_mla.log" | cut -c1-300;;
decode-fused)   # issue 14: every KV pass at 32K with the step fused by Inductor (and the CUDA-graph step beside it)
  timeout 560 python benchmarks/kv.py --out "$OUT/kv_h200_fused.json" --contexts 32768 \
    --variants original kv-window4+1020 think0.5 mla-decoupled0.5 \
    --compile-variants original kv-window4+1020 think0.5 mla-decoupled0.5 --static-peer-contexts --budget-s 500 \
    > "$OUT/kv_fused.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_fused.log" | cut -c1-300;;
decode-batch)   # issue 14: batches 1 / 8 / 32 at 4K against transformers' static-cache generate at each batch
  timeout 560 python benchmarks/kv.py --out "$OUT/kv_h200_batch.json" --contexts 4096 --batches 1 8 32 \
    --variants original --batch-variants original --compile-variants original --static-peer-contexts 4096 \
    > "$OUT/kv_batch.log" 2>&1
  echo "kv rc=$?"; grep '^{' "$OUT/kv_batch.log" | cut -c1-300;;
pending)   # what the 12-07 sessions built and could not time (no device lent), in one call of under 10 minutes, the
           # most telling first (a call cut short keeps what ran): decode-mla-up (the current mla and unthinned steps,
           # then the query-product and value up-projection A / Bs), ncu counters of the mla decode, half-precision
           # decode partials; `pending-linear`: the nibble-table binary GEMV beside the split-K sweep, ncu counters of
           # the other kernels
  bash "$0" decode-mla-up
  NCU_TIMEOUT=45 NCU_CASES="${NCU_CASES:-mla32k:_decode_:2}" timeout 55 bash "$0" ncu
  timeout 80 python benchmarks/decode_attention.py --out "$OUT/decode_attention_${KV_TAG:-h200}_partials.json" \
    --contexts 32768 4096 --default-only --partials float32 half --budget-s 65 > "$OUT/da_partials.log" 2>&1
  echo "partials rc=$?"; grep -E '^best' "$OUT/da_partials.log";;
pending-linear)   # the nibble-table binary GEMV (M = 1, `lut_gemv` in the records) beside the split-K sweep, then ncu
                  # counters of the gqa decode split, the binary GEMV and the band kernel
  timeout 200 python benchmarks/linear.py --binary-only --out "$OUT/linear_${KV_TAG:-h200}_lut.json" \
    > "$OUT/linear_lut.log" 2>&1
  echo "linear rc=$?"; tail -8 "$OUT/linear_lut.log" | cut -c1-300
  NCU_TIMEOUT=45 NCU_CASES="${NCU_CASES:-gqa32k:_decode_split:1 bgemv:_binary:1 band32k:_band:1}" \
    timeout 170 bash "$0" ncu;;
ncu)   # issues 14 / 19: Nsight Compute hardware counters of one call per kernel case (benchmarks/ncu_profile.py):
       # the details page (throughput, occupancy, warp stalls) as text, the SASS with its per-instruction counters as
       # CSV. NCU_CASES: case:kernel-regex:kernels-per-call; NCU_SET: ncu's section set
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  warm=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import ncu_profile as m; print(m.WARMUP)")
  for spec in ${NCU_CASES:-mla32k:_decode_:2 mla4k:_decode_split:1 gqa32k:_decode_:2 bgemv:_binary:1 band32k:_band:1}; do
    c=${spec%%:*}; rest=${spec#*:}; k=${rest%%:*}; n=${rest#*:}; f="$OUT/ncu_${c}"
    timeout ${NCU_TIMEOUT:-100} "$NCU" --clock-control none --set ${NCU_SET:-full} --import-source yes -k regex:$k \
      --launch-skip $(( warm * n )) --launch-count $n -f -o "$f" python benchmarks/ncu_profile.py --case $c > "$f.log" 2>&1
    echo "ncu $c $k rc=$?"
    "$NCU" --import "$f.ncu-rep" --page details > "$f.txt" 2>&1
    "$NCU" --import "$f.ncu-rep" --page source --csv --print-source sass > "${f}_sass.csv" 2>/dev/null
    grep -E "^  [_a-z]|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput" "$f.txt" | head -16
  done;;
*) echo "usage: $0 kernels|models|forms|compiled|fused|issue13|attention|exact|band|decode|decode-gemv|decode-passes|decode-pdl|decode-mla-up|decode-mla|decode-attn|decode-fused|decode-batch|ncu|pending|pending-linear"
   exit 2;;
esac
