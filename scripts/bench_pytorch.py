#!/usr/bin/env python3
"""The PyTorch peer of csp-tch: the same backbones, initialisation, transform and Adam recipe in
PyTorch eager (the tutorial's three written out here, the CSPNet paper's models from timm itself),
timed the same way as `csp-tch bench` (median ms/step after warm-up), and a check that a csp-tch
checkpoint gives the same logits here.

  bench_pytorch.py bench --model darknet53 [--image-size 32] [--batch-size 64] [--steps 10]
                         [--warmup 3] [--mode train|eval] [--device cpu] [--amp] [--channels-last]
                         [--compile [MODE]] [--keep-freed-memory] [--json]
      --amp and --channels-last mean what they mean to csp-tch: on CUDA, bf16 autocast where the GPU
      supports it natively, else fp16 with GradScaler; NHWC weights and inputs. On CUDA, cuDNN's
      benchmark mode is on, as in csp-tch. --compile runs the model through torch.compile (MODE:
      default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs); its
      compilation happens in the warm-up steps, whose wall time the JSON reports as warmup_s.
      --keep-freed-memory sets glibc's allocator as csp-tch sets its own at start-up
      (src/environment.rs).
  bench_pytorch.py equiv --checkpoint CKPT.safetensors --io IO.safetensors [--io ...] [--against peer|timm]
      Each IO holds `input` (NCHW float) and `logits` computed by csp-tch (eval mode); one JSON line
      per IO, and the exit status is 1 when any differs: when the
      largest absolute difference of the logits is 1e-4 or more, for logits of magnitude 1 or less;
      beyond that the bound scales with the largest logit (fp32 rounds a logit of 300 to 3e-5).
      The checkpoint is loaded into this file's network (`peer`, the tutorial's models) or into
      timm's own model (`timm`: always for the CSPNet paper's models, whose variable names are
      timm's; for darknet53, timm's `darknet53` with ReLU, through a map of PaddleClas's names).
"""
import argparse
import ctypes
import json
import math
import statistics
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]
LAYOUTS = {"darknet53": None, "cspdarknet53": 1, "cspdarknet53-pad0": 0}  # CSP 1x1 padding
# csp-tch's names of the CSPNet paper's models -> timm's.
TIMM_MODELS = {"cspdarknet53-paper": "cspdarknet53", "resnet50": "resnet50", "cspresnet50": "cspresnet50",
               "resnext50": "resnext50_32x4d", "cspresnext50": "cspresnext50"}


def timm_model(name, classes, **kwargs):
    import timm  # installed by scripts/setup.sh; needed for the CSPNet paper's models only
    return timm.create_model(name, num_classes=classes, pretrained=False, **kwargs)


def make_model(name, classes=10):
    """The network csp-tch calls `name`: this file's for the tutorial's three, timm's for the others."""
    return Backbone(name, classes) if name in LAYOUTS else timm_model(TIMM_MODELS[name], classes)


def darknet53_timm_name(path):
    """timm's `darknet53` name of a csp-tch darknet53 variable (PaddleClas's naming)."""
    parts = path.split(".")
    if parts[0] == "fc":
        return "head." + path
    if parts[0] == "yolo_input" and parts[1] in ("conv", "bn"):
        return "stem.conv1." + ".".join(parts[1:])
    if parts[:2] == ["yolo_input", "downsample"]:
        return "stages.0.conv_down." + ".".join(parts[2:])
    if parts[0] == "stage" and parts[2] == "downsample":  # stage k's downsample opens stage k + 1
        return f"stages.{int(parts[1]) + 1}.conv_down." + ".".join(parts[3:])
    k, block, conv = parts[1], parts[2], {"0": "conv1", "1": "conv2"}[parts[3]]
    return f"stages.{k}.blocks.{block}.{conv}." + ".".join(parts[4:])


class ConvBN(nn.Module):
    """Conv2d (no bias) -> BatchNorm (eps 1e-5, momentum 0.1) -> ReLU; PaddleClas initialisation."""

    def __init__(self, cin, cout, k, stride, pad):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.conv1 = ConvBN(cin, c, 1, 1, 0)
        self.conv2 = ConvBN(c, 2 * c, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class Stage(nn.Module):
    def __init__(self, k, cin, c, n, pad_1x1):
        super().__init__()
        self.entry = ConvBN(cin, c, 3, 2, 1)
        self.csp = pad_1x1 is not None
        h = c if not self.csp or k == 0 else c // 2
        if self.csp:
            self.part = ConvBN(c, h, 1, 1, pad_1x1)
            self.transition = ConvBN(h, h, 1, 1, 0)
            self.shortcut = ConvBN(c, h, 1, 1, pad_1x1)
            self.fusion = ConvBN(2 * h, c, 1, 1, pad_1x1)
        self.blocks = nn.Sequential(*[BasicBlock(h, h // 2) for _ in range(n)])

    def forward(self, x):
        x = self.entry(x)
        if not self.csp:
            return self.blocks(x)
        part = self.transition(self.blocks(self.part(x)))
        return self.fusion(torch.cat([part, self.shortcut(x)], 1))


class Backbone(nn.Module):
    def __init__(self, name, classes=10):
        super().__init__()
        pad_1x1 = LAYOUTS[name]
        self.stem = ConvBN(3, 32, 3, 1, 1)
        stages, cin = [], 32
        for k, (c, n) in enumerate(STAGES):
            stages.append(Stage(k, cin, c, n, pad_1x1))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)
        bound = 1 / math.sqrt(cin)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.csp_tch_names = self._names(name)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def _names(self, name):
        """{csp-tch layer path: ConvBN}, mirroring csp-tch's nn::Path names."""
        names = {"yolo_input": self.stem}
        for k, stage in enumerate(self.stages):
            if stage.csp:
                names[f"stage.{k}.csp0"] = stage.entry
                names.update({f"stage.{k}.csp1": stage.part, f"stage.{k}.csp3": stage.transition,
                              f"stage.{k}.csp2": stage.shortcut, f"stage.{k}.downsample": stage.fusion})
            else:
                names["yolo_input.downsample" if k == 0 else f"stage.{k - 1}.downsample"] = stage.entry
            for i, block in enumerate(stage.blocks):
                names[f"stage.{k}.{i}.0"], names[f"stage.{k}.{i}.1"] = block.conv1, block.conv2
        return names

    def load_csp_tch(self, tensors):
        """Copies a csp-tch checkpoint's `model/...` tensors into this network."""
        with torch.no_grad():
            for path, layer in self.csp_tch_names.items():
                layer.conv.weight.copy_(tensors[f"model/{path}.conv.weight"])
                for field in ("weight", "bias", "running_mean", "running_var"):
                    getattr(layer.bn, field).copy_(tensors[f"model/{path}.bn.{field}"])
            self.fc.weight.copy_(tensors["model/fc.weight"])
            self.fc.bias.copy_(tensors["model/fc.bias"])


def read_safetensors(path):
    """A minimal safetensors reader (float32 and int64 only), so no extra package is needed."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    dtypes = {"F32": torch.float32, "I64": torch.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(data[8 + n + start:8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"]) if buf else \
            torch.zeros(info["shape"], dtype=dtypes[info["dtype"]])
    return out


def resize(x, size):
    """PIL's bilinear enlargement: horizontal pass, then vertical, each rounded half up to 8 bits."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    x = torch.clamp(torch.floor(F.interpolate(x, size=(h, size), mode="bilinear", align_corners=False) + 0.5), 0, 255)
    return torch.clamp(torch.floor(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) + 0.5), 0, 255)


def batch(images, index, size):
    return (resize(images.index_select(0, index).float(), size) - 0.5) / 0.5


def macs(model, size):
    """The tutorial's MACs of one image: convolution weights times output pixels, plus the head."""
    total = 0
    hooks = []

    def conv_hook(m, _inp, out):
        nonlocal total
        total += m.weight.numel() * out.shape[2] * out.shape[3]

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=head.weight.device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total + head.weight.numel()


def keep_freed_memory():
    """Blocks up to 32 MB stay in glibc's heap when freed, and the heap is not trimmed."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1


def bench(args):
    kept = keep_freed_memory() if args.keep_freed_memory else False
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = make_model(args.model).to(device, memory_format=layout)
    # The eager module stays for macs(); `net` is what the steps run.
    net = torch.compile(model, mode=args.compile) if args.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    amp_dtype = None
    if args.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    bs = args.batch_size
    images = torch.randint(0, 256, (4 * bs, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (4 * bs,), device=device)
    model.train(args.mode == "train")
    times = []
    warmup_started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            warmup_s = time.perf_counter() - warmup_started
        index = torch.arange((step % 4) * bs, (step % 4 + 1) * bs, device=device)
        start = time.perf_counter()
        xs = batch(images, index, args.image_size).contiguous(memory_format=layout)
        if args.mode == "train":
            with autocast():
                loss = F.cross_entropy(net(xs).float(), labels.index_select(0, index))
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            with torch.no_grad(), autocast():
                net(xs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    passes = 3 if args.mode == "train" else 1
    result = {
        "implementation": "pytorch", "torch": torch.__version__, "model": args.model,
        "image_size": args.image_size, "batch_size": bs, "mode": args.mode, "device": args.device,
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32"),
        "channels_last": args.channels_last, "compile": args.compile,
        "threads": torch.get_num_threads(), "keeps_freed_memory": kept, "steps": args.steps, "warmup": args.warmup,
        "warmup_s": warmup_s, "ms_per_step": ms, "images_per_s": bs / ms * 1e3,
        "gflops": 2 * macs(model, args.image_size) * passes * bs / ms / 1e6, "step_ms": times,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} {args.mode} {args.image_size} px, batch {bs}, {args.device} "
              f"({result['threads']} threads): {ms:.1f} ms/step, {result['images_per_s']:.1f} images/s, "
              f"{result['gflops']:.1f} GFLOP/s (PyTorch {torch.__version__} "
              f"{'torch.compile ' + args.compile if args.compile else 'eager'})")


def load_into_timm(tensors, name, classes):
    """timm's network of csp-tch's `name` with the checkpoint's variables (renamed for darknet53)."""
    rename = darknet53_timm_name if name == "darknet53" else (lambda path: path)
    model = timm_model("darknet53", classes, act_layer="relu") if name == "darknet53" else \
        timm_model(TIMM_MODELS[name], classes)
    state = {rename(k[len("model/"):]): v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tch's BatchNorm keeps no batch counter; everything else must match one to one.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{name}: timm's model and the checkpoint differ: missing {missing}, unexpected {unexpected}")
    return model


def equiv(args):
    tensors = read_safetensors(args.checkpoint)
    with open(args.checkpoint, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(json.loads(f.read(n))["__metadata__"]["csp_tch"])
    name, classes = meta["model"], meta["config"]["classes"]
    if args.against == "timm" or name not in LAYOUTS:
        if name not in TIMM_MODELS and name != "darknet53":
            raise SystemExit(f"{name} has no timm counterpart")
        model = load_into_timm(tensors, name, classes)
    else:
        model = Backbone(name, classes)
        model.load_csp_tch(tensors)
    model.eval()
    against = "peer" if isinstance(model, Backbone) else "timm"
    failed = False
    for path in args.io:
        io = read_safetensors(path)
        with torch.no_grad():
            logits = model(io["input"])
        diff = (logits - io["logits"]).abs().max().item()
        bound = 1e-4 * max(1.0, io["logits"].abs().max().item())
        failed |= not diff < bound
        print(json.dumps({"model": name, "io": path, "against": against, "max_abs_diff": diff, "bound": bound,
                          "ok": diff < bound}))
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True, choices=sorted(LAYOUTS) + sorted(TIMM_MODELS))
    b.add_argument("--image-size", type=int, default=32)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--mode", choices=["train", "eval"], default="train")
    b.add_argument("--device", default="cpu")
    b.add_argument("--amp", action="store_true")
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    b.add_argument("--keep-freed-memory", action="store_true")
    b.add_argument("--json", action="store_true")
    e = sub.add_parser("equiv")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--io", required=True, action="append", help="one or more IO files, one JSON line each")
    e.add_argument("--against", choices=["peer", "timm"], default="peer")
    args = parser.parse_args()
    return bench(args) if args.command == "bench" else equiv(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
