#!/usr/bin/env bash
# csp-tch's GPU measurements in one call, for the device machine (one GPU, PyTorch in python3, no
# Rust): build the binary here with scripts/prepare-device.sh (it lands in .device/), then on the
# device, from the checkout root (the device tool allows 600 s a command, so give it timeout_s 600):
#   OUT=$OUT bash scripts/gpu-check.sh
# Parts, in order of what matters most (PARTS, default "graphs recipe staged ddp bench run compile"):
#   graphs   `csp-tch check-graphs` for each model at 224 px, fp32 and --amp: replayed steps within the noise
#            floor of two eager runs, over a schedule with partial batches, evaluations and a new learning rate;
#   recipe   2 epochs of cspdarknet53-pad0 on a CIFAR-10 subset with every recipe piece past the tutorial's
#            (AdamW, per-step cosine with warm-up, rrc-flip, EMA, smoothing, clipping) replayed from CUDA
#            graphs and eagerly: `csp-tch compare` of the two (recipe/graphed, recipe/eager);
#   staged   1 epoch of cspdarknet53-pad0 on the recipe part's subset with --data-on host (each batch staged
#            through pinned memory, the next one's copy on a side stream) and --data-on device: `csp-tch
#            compare` of the two (they must be identical) and each one's ms/step (staged/host, staged/device);
#   ddp      a data-parallel run of world size 1 through NCCL (the machine has one GPU): `--nproc-per-node 1`,
#            1 epoch of cspdarknet53-pad0 on the recipe part's subset three ways: recorded in CUDA graphs with
#            the allreduce inside (the default), eager, and eager with the allreduce after the backward pass;
#            `csp-tch compare` of recorded against eager and of the two eager ones (identical), then `bench
#            --nproc-per-node 1` the same three ways beside single-process benches with and without graphs
#            (what the data-parallel step costs);
#   bench    train steps, 224 px, batch 64, median of BENCH_STEPS after warm-up, alternating: csp-tch with
#            CUDA graphs (the default) and without, PyTorch eager (NHWC, cuDNN benchmark mode, foreach Adam),
#            each in fp32 and --amp;
#   run      `csp-tch run-all --preset tutorial --amp` (RUN_ARGS: the tutorial's three), capped at RUN_S s;
#   compile  PyTorch torch.compile (COMPILE_MODES, default "default") of COMPILE_MODELS (default darknet53),
#            fp32 and --amp: the strongest PyTorch a user could pick, slow to compile, so last.
# MODELS (default the tutorial's three) takes any csp-tch model, e.g. "resnet50 cspresnet50".
# No step starts after UNTIL s (default 540) from the start, and the run's cap shrinks to fit, so that
# the results come back within the device's limit; what was skipped is said in the log.
# Results in $OUT: log.txt, graphs.jsonl, bench.jsonl (one JSON object per line, as `bench --json`
# writes them; the table at the end of the log reads it), recipe/{on,off}/ and run/ (the runs' CSVs and
# reports, no checkpoints), staged/{host,device}/, ddp/{recorded,eager,after-backward}/ and ddp-bench.jsonl.
# Try it here first with tiny settings:
#   OUT=/tmp/g DEVICE=cpu BIN=target/release/csp-tch SIZE=32 BENCH_STEPS=2 RUN_ARGS="--preset quick --epochs 1 \
#     --train-limit 256 --test-limit 128" DATA=data/cifar-10-batches-bin PY=$CSP_TCH_PYTHON bash scripts/gpu-check.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
BIN=${BIN:-.device/csp-tch}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-graphs recipe staged ddp bench run compile}
SIZE=${SIZE:-224}
BENCH_STEPS=${BENCH_STEPS:-20}
COMPILE_MODES=${COMPILE_MODES-default}
COMPILE_MODELS=${COMPILE_MODELS-darknet53}
UNTIL=${UNTIL:-540}
RUN_S=${RUN_S:-300}
RUN_ARGS=${RUN_ARGS:---preset tutorial --amp}
DATA=${DATA:-/tmp/cifar10/cifar-10-batches-bin}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
say() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
wants() { [[ " $PARTS " == *" $1 "* ]]; }
left() { echo $(( UNTIL - ($(date +%s) - T0) )); }
# Whether there is time for a step that may take $1 s; says what it skips when there is not.
time_for() { [ "$(left)" -ge "$1" ] || { say "skipped (${1} s needed, $(left) s left): ${*:2}"; false; }; }
# csp-tch built against the device's libtorch finds it through the PyTorch installed there.
torch_lib=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")') || { say "no torch in $PY"; exit 1; }
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say start
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
"$BIN" env >"$OUT/env.txt" || { say "csp-tch cannot start (ldd: $(ldd "$BIN" | grep 'not found'))"; exit 1; }
cat "$OUT/env.txt"
# Everything below measures the CUDA-graph path: a binary without it would measure the wrong thing.
grep -q '^CUDA graphs: available in this build' "$OUT/env.txt" ||
  { say "FAILED: $BIN has no CUDA graphs ($(grep '^CUDA graphs' "$OUT/env.txt")); rebuild with scripts/prepare-device.sh"; exit 1; }

# The binary knows which models run by default.
MODELS=${MODELS:-$("$BIN" models --default | tr '\n' ' ')}

if wants graphs; then
  for model in $MODELS; do
    for amp in "" --amp; do
      time_for 60 "check-graphs $model $amp" || continue
      say "check-graphs $model $amp"
      timeout 120 "$BIN" check-graphs --model "$model" --image-size "$SIZE" --device "$DEVICE" $amp --json \
        >>"$OUT/graphs.jsonl" || say "check-graphs $model $amp failed"
    done
  done
fi

# CIFAR-10 for the parts that train, decoded once from the JPEG copy that prepare-device packs.
need_data() {
  [ -f "$DATA/test_batch.bin" ] && return 0
  say "data: decoding CIFAR-10 into $DATA"
  tmp=$(mktemp -d) && tar xzf .device/cifar10-jpeg.tar.gz -C "$tmp" && $PY .device/jpeg_to_cifar_bin.py "$tmp" "$DATA" \
    && rm -rf "$tmp" || { say "data failed"; return 1; }
}

RECIPE=(--opt adamw --weight-decay 0.05 --sched cosine --sched-on step --warmup-epochs 1 --aug rrc-flip --ema 0.999
  --label-smoothing 0.1 --clip-grad 5 --epochs 2 --train-limit 4096 --test-limit 1024 --image-size "$SIZE")
if wants recipe && time_for 120 "recipe, graphed and eager" && need_data; then
  for graphs in on off; do
    say "recipe, --cuda-graphs $graphs"
    timeout 200 "$BIN" train --model cspdarknet53-pad0 "${RECIPE[@]}" --cuda-graphs "$graphs" --device "$DEVICE" \
      --data-dir "$DATA" --out "$OUT/recipe/$graphs" || say "recipe run with --cuda-graphs $graphs failed"
    rm -rf "$OUT/recipe/$graphs/checkpoints"
  done
  "$BIN" compare "$OUT/recipe/on" "$OUT/recipe/off" || say "graphed and eager recipe runs differ (see above)"
fi

if wants staged && time_for 90 "host-staged and device-held runs" && need_data; then
  for on in host device; do
    say "staged: train --data-on $on"
    timeout 150 "$BIN" train --model cspdarknet53-pad0 --epochs 1 --train-limit 4096 --test-limit 1024 --image-size "$SIZE" \
      --data-on "$on" --device "$DEVICE" --data-dir "$DATA" --out "$OUT/staged/$on" || say "run with --data-on $on failed"
    rm -rf "$OUT/staged/$on/checkpoints"
    grep -o '"mean_train_ms_per_step": *[0-9.]*' "$OUT/staged/$on/comparison.json" 2>/dev/null | sed "s/^/--data-on $on: /"
  done
  "$BIN" compare "$OUT/staged/host" "$OUT/staged/device" || say "host-staged and device-held runs differ (see above)"
fi

common=(--image-size "$SIZE" --mode train --steps "$BENCH_STEPS" --warmup 5 --device "$DEVICE" --json)
DDP_WAYS=("recorded:" "eager:--cuda-graphs off" "after-backward:--cuda-graphs off --dist-overlap off")
if wants ddp && time_for 240 "data-parallel runs and bench" && need_data; then
  for way in "${DDP_WAYS[@]}"; do
    name=${way%%:*} flags=${way#*:}
    say "data-parallel: train --nproc-per-node 1 (NCCL on CUDA), $name (${flags:-the default flags})"
    timeout 200 "$BIN" train --model cspdarknet53-pad0 --epochs 1 --train-limit 4096 --test-limit 1024 \
      --image-size "$SIZE" --nproc-per-node 1 --dist-timeout 60 $flags --device "$DEVICE" \
      --data-dir "$DATA" --out "$OUT/ddp/$name" || say "data-parallel run $name failed"
    rm -rf "$OUT/ddp/$name/checkpoints"
  done
  "$BIN" compare "$OUT/ddp/recorded" "$OUT/ddp/eager" || say "recorded and eager data-parallel runs differ"
  "$BIN" compare "$OUT/ddp/eager" "$OUT/ddp/after-backward" || say "overlapped and plain allreduce runs differ"
  for way in "${DDP_WAYS[@]}"; do
    timeout 120 "$BIN" bench --model cspdarknet53-pad0 "${common[@]}" --nproc-per-node 1 --dist-timeout 60 ${way#*:} \
      >>"$OUT/ddp-bench.jsonl" || say "bench --nproc-per-node 1 ${way#*:} failed"
  done
  for single in "" "--cuda-graphs off"; do
    timeout 120 "$BIN" bench --model cspdarknet53-pad0 "${common[@]}" $single >>"$OUT/ddp-bench.jsonl" \
      || say "bench $single failed"
  done
  cat "$OUT/ddp-bench.jsonl" 2>/dev/null
fi
if wants bench; then
  for model in $MODELS; do
    for amp in "" --amp; do
      time_for 90 "bench $model ${amp:-fp32}" || continue
      say "bench $model ${amp:-fp32}"
      timeout 120 "$BIN" bench --model "$model" "${common[@]}" $amp >>"$OUT/bench.jsonl" || say "csp-tch bench failed"
      timeout 120 $PY scripts/bench_pytorch.py bench --model "$model" "${common[@]}" $amp --channels-last \
        >>"$OUT/bench.jsonl" || say "PyTorch eager bench failed"
      timeout 120 "$BIN" bench --model "$model" "${common[@]}" $amp --cuda-graphs off >>"$OUT/bench.jsonl" \
        || say "csp-tch eager bench failed"
    done
  done
fi

if wants run && time_for 90 "run-all $RUN_ARGS"; then
  need_data || exit 1
  cap=$(( $(left) - 20 < RUN_S ? $(left) - 20 : RUN_S ))
  say "run-all $RUN_ARGS (cap ${cap}s)"
  run=$(mktemp -d)
  started=$(date +%s)
  timeout -s INT -k 15 "$cap" "$BIN" run-all $RUN_ARGS --device "$DEVICE" --data-dir "$DATA" --out "$run"
  say "run-all exit $? after $(( $(date +%s) - started )) s wall time"
  "$BIN" report --out "$run" >/dev/null 2>&1 || true
  mkdir -p "$OUT/run" && (cd "$run" && cp ./*.csv ./comparison.* ./curves.svg "$OUT/run/" 2>/dev/null)
fi

if wants compile; then
  for model in $COMPILE_MODELS; do
    for amp in "" --amp; do
      for mode in $COMPILE_MODES; do
        time_for 150 "torch.compile $mode $model ${amp:-fp32}" || continue
        say "torch.compile $mode $model ${amp:-fp32}"
        timeout 240 $PY scripts/bench_pytorch.py bench --model "$model" "${common[@]}" $amp --channels-last \
          --compile "$mode" >>"$OUT/bench.jsonl" || say "PyTorch compile $mode bench failed"
      done
    done
  done
fi

[ -s "$OUT/bench.jsonl" ] && $PY scripts/bench_table.py "$OUT/bench.jsonl"
say done
