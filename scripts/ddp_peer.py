#!/usr/bin/env python3
"""The PyTorch peer of csp-tch's data-parallel training: torch.distributed over Gloo on 127.0.0.1,
DistributedDataParallel around this repository's peer network (scripts/bench_pytorch.py),
DistributedSampler's shards (shuffle off, over csp-tch's own shuffle of the epoch, so both see the
same images), fused Adam or SGD as csp-tch's, `--world` processes started with torch.multiprocessing.

  ddp_peer.py train --checkpoint INIT.safetensors --model NAME --data DATA.safetensors
                    --out OUT.safetensors [--world 2] [--batch-size 8] [--opt adam|sgd] [--lr 1e-3]
                    [--momentum 0.9] [--normalize tutorial|unit] [--threads 1] [--sync-bn]
      DATA holds `train_images` (N,3,H,W float 0..255), `train_labels`, `order` (the epoch's shuffle),
      `test_images`, `test_labels`. One epoch; then rank 0 evaluates its model on every test image.
      --sync-bn: each ConvBN's BatchNorm becomes CpuSyncBatchNorm (torch.nn.SyncBatchNorm's autograd
      function in CPU ops: PyTorch's own refuses CPU tensors).
      OUT: rank 0's tensors under csp-tch's names (`model/...`), and `train_loss_sum`, `train_images`
      (over all ranks), `eval_loss_sum`, `eval_correct`.
  ddp_peer.py bench --model NAME [--world 2] [--batch-size 8] [--image-size 32] [--steps 10] [--warmup 3]
      Median ms/step of DDP training (fused Adam) on random data as DDP runs it (allreduce overlapped
      with the backward pass), then with a communication hook that waits for each bucket's allreduce and
      times it: the ms of a step spent in the allreduce. One JSON line, rank 0's.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pytorch import make_model, read_safetensors, resize  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def csp_tch_tensors(model):
    """{csp-tch name: tensor} of the peer network's parameters and BatchNorm statistics."""
    out = {}
    for path, layer in model.csp_tch_names.items():
        out[f"model/{path}.conv.weight"] = layer.conv.weight
        for field in ("weight", "bias", "running_mean", "running_var"):
            out[f"model/{path}.bn.{field}"] = getattr(layer.bn, field)
    out["model/fc.weight"], out["model/fc.bias"] = model.fc.weight, model.fc.bias
    return out


def inputs(images, index, size, normalize):
    """csp-tch's transform: the tutorial's Normalize(0.5, 0.5) on raw pixels, or on pixels in [0, 1]."""
    pixels = resize(images.index_select(0, index).float(), size)
    return (pixels - 0.5) / 0.5 if normalize == "tutorial" else (pixels / 255.0 - 0.5) / 0.5


class SyncBatchNormFunction(torch.autograd.Function):
    """torch.nn.SyncBatchNorm's training step (torch/nn/modules/_functions.py) in CPU ops, since
    torch.nn.SyncBatchNorm refuses CPU tensors and torch.batch_norm_stats has no CPU kernel: the
    ranks' counts, means and squared deviations gathered and combined (batch_norm_gather_stats_with_counts),
    running statistics updated with the variance unbiased over all images, and in the backward pass
    sum(dy) and sum(dy * (x - mean)) summed over the ranks (batch_norm_backward_reduce / _elemt)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        world, rank = dist.get_world_size(), dist.get_rank()
        dims, n = (0, 2, 3), x.numel() // x.shape[1]
        local_mean = x.mean(dims)
        gathered = torch.zeros(world, 3, x.shape[1])
        gathered[rank, 0], gathered[rank, 1] = n, local_mean
        gathered[rank, 2] = (x - local_mean.view(1, -1, 1, 1)).square().sum(dims)
        dist.all_reduce(gathered)
        counts, means = gathered[:, 0], gathered[:, 1]
        count = counts.sum(0)
        mean = (counts * means).sum(0) / count
        var = (gathered[:, 2] + counts * (means - mean).square()).sum(0) / count
        invstd = (var + eps).rsqrt()
        total = count[0].item()
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        shape, dims = (1, -1, 1, 1), (0, 2, 3)
        xmu = x - mean.view(shape)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy.clone()
        sums = torch.stack([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums)
        mean_dy, mean_dy_xmu = (sums[0] / ctx.total).view(shape), (sums[1] / ctx.total).view(shape)
        scale = invstd.view(shape)
        grad_input = (dy - mean_dy - xmu * scale.square() * mean_dy_xmu) * scale * weight.view(shape)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics are those of every rank's images."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        return SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                           self.momentum, self.eps)


def synchronise_batch_norms(model):
    """Replaces every ConvBN's BatchNorm by a CpuSyncBatchNorm holding the same tensors."""
    for layer in model.csp_tch_names.values():
        bn = layer.bn
        sync = CpuSyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        sync.load_state_dict(bn.state_dict())
        layer.bn = sync


def setup(rank, world, port, threads=1):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def train(rank, args, port):
    setup(rank, args.world, port, args.threads)
    data = read_safetensors(args.data)
    model = make_model(args.model)
    model.load_csp_tch(read_safetensors(args.checkpoint))
    if args.sync_bn:
        synchronise_batch_norms(model)
    ddp = DDP(model)
    if args.opt == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum, fused=True)
    else:
        opt = torch.optim.Adam(ddp.parameters(), lr=args.lr, fused=True)
    order = data["order"]
    sampler = torch.utils.data.DistributedSampler(range(len(order)), num_replicas=args.world, rank=rank,
                                                  shuffle=False)
    mine = order[torch.tensor(list(sampler))]
    size = data["train_images"].shape[-1]
    loss_sum, images = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    ddp.train()
    for start in range(0, len(mine), args.batch_size):
        index = mine[start:start + args.batch_size]
        if len(index) < 2:
            break
        x = inputs(data["train_images"], index, size, args.normalize)
        y = data["train_labels"].index_select(0, index)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(index)
        images += len(index)
    dist.all_reduce(loss_sum)
    dist.all_reduce(images)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            logits = model(inputs(data["test_images"], torch.arange(len(data["test_labels"])), size, args.normalize))
            eval_loss = F.cross_entropy(logits, data["test_labels"], reduction="sum").double()
            correct = (logits.argmax(1) == data["test_labels"]).sum().double()
        from safetensors.torch import save_file
        out = {name: t.detach().contiguous().clone() for name, t in csp_tch_tensors(model).items()}
        out.update(train_loss_sum=loss_sum, train_images=images, eval_loss_sum=eval_loss.reshape(1),
                   eval_correct=correct.reshape(1))
        save_file(out, args.out)
    dist.destroy_process_group()


def bench(rank, args, port, results):
    """DDP's own step time (its allreduce overlapped with the backward pass), then the same steps with a
    communication hook that waits for each bucket's allreduce and times it."""
    setup(rank, args.world, port)
    torch.manual_seed(0)
    model = make_model(args.model)
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3, fused=True)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    allreduce_s = []

    def steps():
        step_ms, reduce_ms = [], []
        for i in range(args.warmup + args.steps):
            allreduce_s.clear()
            started = time.perf_counter()
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= args.warmup:
                step_ms.append((time.perf_counter() - started) * 1e3)
                reduce_ms.append(sum(allreduce_s) * 1e3)
        return statistics.median(step_ms), statistics.median(reduce_ms)

    ms_per_step, _ = steps()

    def timed_allreduce(state, bucket):
        started = time.perf_counter()
        tensor = bucket.buffer().div_(args.world)
        dist.all_reduce(tensor)
        allreduce_s.append(time.perf_counter() - started)
        fut = torch.futures.Future()
        fut.set_result(tensor)
        return fut

    ddp.register_comm_hook(None, timed_allreduce)
    hooked_ms, allreduce_ms = steps()
    if rank == 0:
        results.put({"implementation": "pytorch-ddp", "model": args.model, "world_size": args.world,
                     "batch_size": args.batch_size, "image_size": args.image_size, "threads": torch.get_num_threads(),
                     "ms_per_step": ms_per_step, "ms_per_step_allreduce_waited": hooked_ms,
                     "allreduce_ms_per_step": allreduce_ms, "torch": torch.__version__})
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--sync-bn", action="store_true")
    t.add_argument("--normalize", choices=["tutorial", "unit"], default="tutorial")
    t.add_argument("--threads", type=int, default=1, help="libtorch threads per process (1 and 2 give the "
                   "rounding spread that tests/distributed.rs bounds csp-tch by)")
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--image-size", type=int, default=32)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    for p in (t, b):
        p.add_argument("--world", type=int, default=2)
        p.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--opt", choices=["adam", "sgd"], default="adam")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--momentum", type=float, default=0.9)
    args = parser.parse_args()
    port = free_port()
    if args.command == "train":
        mp.spawn(train, args=(args, port), nprocs=args.world, join=True)
    else:
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(bench, args=(args, port, results), nprocs=args.world, join=True)
        print(json.dumps(results.get()))


if __name__ == "__main__":
    main()
