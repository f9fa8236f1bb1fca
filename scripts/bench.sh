#!/usr/bin/env bash
# csp-tch against PyTorch eager (the torch that scripts/setup.sh installed), side by side on this machine:
# for each model and mode, rounds that alternate which of the two runs first; prints the median ms/step of
# each and PyTorch's time over csp-tch's (above 1: csp-tch is faster), through scripts/bench_table.py.
#   scripts/bench.sh [--models a,b,c] [--modes train,eval] [--image-size 32] [--batch-size 64]
#                    [--steps 10] [--warmup 3] [--rounds 3] [--device cpu] [--amp] [--channels-last]
#                    [--peer-keeps-freed-memory] [--peer-compile MODE] [--out FILE.jsonl]
# --amp and --channels-last go to both sides. Without --channels-last, csp-tch runs its default layout
# (--memory-format auto) and PyTorch its own (NCHW); the table says which each used. csp-tch keeps freed
# memory in its heap (src/environment.rs); --peer-keeps-freed-memory sets PyTorch's glibc the same way.
# --peer-compile MODE runs PyTorch through torch.compile (default, reduce-overhead, max-autotune, ...).
#   scripts/bench.sh --data-folder DIR [--image-size 224] [--limit N] [--rounds 3]
# instead times the loaders on the image folder DIR (its train/ split): `csp-tch data bench` (decode and
# resize on every core, then an epoch's gathers once held) against torchvision's ImageFolder + DataLoader
# with one worker per core (scripts/bench_imagefolder.py), images/s and per-epoch time side by side.
#   scripts/bench.sh --ddp N [--models a] [--image-size 32] [--batch-size 64] [--steps 10] [--rounds 3]
# instead times data-parallel train steps on N CPU processes over Gloo: `csp-tch bench --nproc-per-node N`,
# its allreduce after the backward pass and overlapped with it (--dist-overlap off, on),
# against PyTorch's DistributedDataParallel (scripts/ddp_peer.py bench), the step time and the ms of it in
# the gradient allreduce, side by side (the first model only, darknet53 unless --models names one).
set -euo pipefail
cd "$(dirname "$0")/.."
models="" modes=train,eval image_size=32 batch_size=64
steps=10 warmup=3 rounds=3 device=cpu out="" options=() peer_options=() data_folder="" limit="" ddp=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models|--modes|--image-size|--batch-size|--steps|--warmup|--rounds|--device|--out|--peer-compile|--data-folder|--limit|--ddp)
      [ $# -ge 2 ] || { echo "bench.sh: $1 needs a value (see the header of $0)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --amp|--channels-last) options+=("$1"); shift; continue ;;
    --peer-keeps-freed-memory) peer_options+=(--keep-freed-memory); shift; continue ;;
    --peer-compile) peer_options+=(--compile "$2") ;;
    --models) models=$2 ;; --modes) modes=$2 ;; --image-size) image_size=$2 ;; --batch-size) batch_size=$2 ;;
    --steps) steps=$2 ;; --warmup) warmup=$2 ;; --rounds) rounds=$2 ;; --device) device=$2 ;; --out) out=$2 ;;
    --data-folder) data_folder=$2 ;; --limit) limit=$2 ;; --ddp) ddp=$2 ;;
    *) echo "bench.sh: unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
scripts/setup.sh >/dev/null
cargo build --release --quiet
# The binary knows which models run by default.
[ -n "$models" ] || models=$(target/release/csp-tch models --default | paste -sd, -)
py=$(sed -n 's/^CSP_TCH_PYTHON = "\(.*\)"$/\1/p' .cargo/config.toml 2>/dev/null || true)
py=${py:-python3}
"$py" -c 'import torch' 2>/dev/null || { echo "bench.sh: $py has no torch; run scripts/setup.sh" >&2; exit 1; }
lines=$(mktemp); trap 'rm -f "$lines"' EXIT
if [ -n "$data_folder" ]; then
  [ "$image_size" != 32 ] || image_size=224
  limits=(); [ -z "$limit" ] || limits=(--limit "$limit")
  for round in $(seq "$rounds"); do
    ours=(target/release/csp-tch data bench --data-dir "$data_folder" --image-size "$image_size" --batch-size "$batch_size" --device "$device" ${limits[@]+"${limits[@]}"} --json)
    theirs=("$py" scripts/bench_imagefolder.py "$data_folder/train" --image-size "$image_size" --batch-size "$batch_size" --workers "$(nproc)" ${limits[@]+"${limits[@]}"})
    if [ $((round % 2)) -eq 1 ]; then order=(ours theirs); else order=(theirs ours); fi
    for who in "${order[@]}"; do
      if [ "$who" = ours ]; then "${ours[@]}" 2>/dev/null; else "${theirs[@]}"; fi >> "$lines"
    done
    echo "bench: data round $round/$rounds done" >&2
  done
  [ -z "$out" ] || cp "$lines" "$out"
  "$py" scripts/bench_table.py "$lines"
  exit 0
fi
if [ -n "$ddp" ]; then
  model=${models%%,*}; model=${model:-darknet53}
  sizes=(--image-size "$image_size" --batch-size "$batch_size" --steps "$steps" --warmup "$warmup")
  for round in $(seq "$rounds"); do
    ours=(target/release/csp-tch bench --model "$model" "${sizes[@]}" --device cpu --nproc-per-node "$ddp" --json)
    theirs=("$py" scripts/ddp_peer.py bench --model "$model" "${sizes[@]}" --world "$ddp")
    if [ $((round % 2)) -eq 1 ]; then order=(off on theirs); else order=(theirs on off); fi
    for who in "${order[@]}"; do
      case $who in
        theirs) "${theirs[@]}" ;;
        *) OMP_NUM_THREADS=1 "${ours[@]}" --dist-overlap "$who" 2>/dev/null ;;
      esac >> "$lines"
    done
    echo "bench: data-parallel round $round/$rounds done" >&2
  done
  [ -z "$out" ] || cp "$lines" "$out"
  "$py" scripts/bench_table.py "$lines"
  exit 0
fi
common=(--image-size "$image_size" --batch-size "$batch_size" --steps "$steps" --warmup "$warmup" --device "$device" ${options[@]+"${options[@]}"} --json)
for model in ${models//,/ }; do
  for mode in ${modes//,/ }; do
    for round in $(seq "$rounds"); do
      ours=(target/release/csp-tch bench --model "$model" --mode "$mode" "${common[@]}")
      theirs=("$py" scripts/bench_pytorch.py bench --model "$model" --mode "$mode" "${common[@]}" ${peer_options[@]+"${peer_options[@]}"})
      if [ $((round % 2)) -eq 1 ]; then order=(ours theirs); else order=(theirs ours); fi
      for who in "${order[@]}"; do
        if [ "$who" = ours ]; then "${ours[@]}"; else "${theirs[@]}"; fi >> "$lines"
      done
      echo "bench: $model $mode round $round/$rounds done" >&2
    done
  done
done
[ -z "$out" ] || cp "$lines" "$out"
"$py" scripts/bench_table.py "$lines"
