"""The side-by-side table of `csp-tch bench --json` and `scripts/bench_pytorch.py bench --json` lines,
for scripts/bench.sh and scripts/gpu-check.sh: per model, mode and precision, each implementation's
median ms/step over its lines (rounds), images/s, warm-up, and PyTorch eager's time over its own
(above 1: faster than PyTorch eager). Models and modes appear in the order the lines first name them.
Lines of `csp-tch data bench --json` and `scripts/bench_imagefolder.py` (kind "data") make the loader
table instead: images/s to decode and resize, and an epoch's time once read, medians over rounds.
Data-parallel lines (`csp-tch bench --nproc-per-node N`, `scripts/ddp_peer.py bench`: `world_size` set) make
the data-parallel table: step time and the ms of it in the gradient allreduce.

    python3 scripts/bench_table.py BENCH.jsonl
"""
import json
import statistics
import sys


def who(r):
    if r["implementation"] == "csp-tch":
        return "csp-tch, CUDA graphs" if r.get("cuda_graphs") else "csp-tch"
    return f"PyTorch torch.compile {r['compile']}" if r.get("compile") else "PyTorch eager"


def by_implementation(runs):
    """{implementation: its lines}, in the order the lines first name them."""
    by_who = {}
    for r in runs:
        by_who.setdefault(r["implementation"], []).append(r)
    return by_who


def data_table(runs):
    first = runs[0]
    print(f"{first['images']} images of {first['folder']} at {first['image_size']} px, batch {first['batch_size']}, "
          "medians over rounds")
    print()
    print("| loader | workers/threads | decode + resize images/s | epoch once read, ms | csp-tch's images/s over this |")
    print("|---|---:|---:|---:|---:|")
    by_who = by_implementation(runs)
    rate = {w: statistics.median(r["decode_images_per_s"] for r in rs) for w, rs in by_who.items()}
    for w, rs in by_who.items():
        if w == "csp-tch":
            simd = "SIMD" if rs[0].get("jpeg_simd") else "plain C"
            name = f"csp-tch (libjpeg-turbo {simd}; decoded once, gathered from memory)"
        else:
            name = "torchvision ImageFolder + DataLoader (decodes every epoch)"
        epoch = statistics.median(r["epoch_gather_ms"] for r in rs)
        ratio = f"{rate['csp-tch'] / rate[w]:.2f}x" if "csp-tch" in rate else "-"
        print(f"| {name} | {rs[0]['threads']} | {rate[w]:.0f} | {epoch:.1f} | {ratio} |")


def ddp_table(runs):
    first = runs[0]
    print(f"data-parallel train steps: {first['model']}, {first['image_size']} px, batch {first['batch_size']} per "
          f"process, {first['world_size']} CPU processes over Gloo, medians over rounds")
    print()
    print("| who | ms/step | allreduce ms/step | PyTorch DDP ms / this ms |")
    print("|---|---:|---:|---:|")
    # csp-tch's lines apart by --dist-overlap (an overlapped bench says how much it launched early).
    by_who = by_implementation([dict(r, implementation=r["implementation"] + (" overlapped" if r.get("allreduce_overlap") else ""))
                                for r in runs])
    step = {w: statistics.median(r["ms_per_step"] for r in rs) for w, rs in by_who.items()}
    reduce = {w: statistics.median(r["allreduce_ms_per_step"] for r in rs) for w, rs in by_who.items()}
    names = {"csp-tch": "csp-tch, `--dist-overlap off` (allreduce after the backward pass)",
             "pytorch-ddp": "PyTorch DistributedDataParallel (allreduce overlapped; timed with a waiting hook)"}
    for w, rs in by_who.items():
        name = names.get(w, w)
        if w == "csp-tch overlapped":
            early = statistics.median(r["allreduce_overlap"]["launched_during_backward"] for r in rs)
            name = (f"csp-tch, `--dist-overlap on` ({early:.0%} of buckets launched during the backward pass; "
                    f"allreduce: the wait after it)")
        ratio = f"{step['pytorch-ddp'] / step[w]:.2f}" if "pytorch-ddp" in step else "-"
        print(f"| {name} | {step[w]:.1f} | {reduce[w]:.1f} | {ratio} |")


def main(path):
    runs = [json.loads(line) for line in open(path) if line.strip()]
    if not runs:
        sys.exit(f"{path}: no bench lines")
    if all(r.get("kind") == "data" for r in runs):
        return data_table(runs)
    if all(r.get("world_size") for r in runs):
        return ddp_table(runs)
    first = runs[0]
    kept = {name: all(r.get("keeps_freed_memory", False) for r in runs if (r["implementation"] == "csp-tch") == (name == "csp-tch"))
            for name in ("csp-tch", "PyTorch")}
    print(f"{first['image_size']} px, batch {first['batch_size']}, {first['device']}, {first['threads']} threads, "
          f"median ms/step over {first['steps']} steps after {first['warmup']} warm-up, median over rounds")
    print("freed memory kept in the heap: " + ", ".join(f"{n} {'yes' if k else 'no (glibc defaults)'}" for n, k in kept.items()))
    print()
    print("| model | mode | precision | who | layout | ms/step | images/s | warm-up s | PyTorch eager ms / this ms |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["mode"], r["precision"]), {}).setdefault(who(r), []).append(r)
    for (model, mode, precision), by_who in groups.items():
        median = {w: statistics.median(r["ms_per_step"] for r in rs) for w, rs in by_who.items()}
        base = median.get("PyTorch eager")
        for w, rs in by_who.items():
            layout = "/".join(sorted({"NHWC" if r["channels_last"] else "NCHW" for r in rs}))
            warmup = statistics.median(r.get("warmup_s", float("nan")) for r in rs)
            ratio = f"{base / median[w]:.2f}x" if base else "-"
            print(f"| {model} | {mode} | {precision} | {w} | {layout} | {median[w]:.2f} | "
                  f"{first['batch_size'] / median[w] * 1e3:.1f} | {warmup:.1f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
