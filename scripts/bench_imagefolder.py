"""torchvision's side of `csp-tch data bench`: ImageFolder + DataLoader (PIL, Resize([S, S]),
PILToTensor, `--workers` processes, default one per core) over the same folder, timed from the
first file to the last batch; two epochs, since every epoch decodes again. One JSON line.

    python bench_imagefolder.py ROOT [--image-size 224] [--limit N] [--batch-size 64] [--workers N]
"""
import argparse
import json
import os
import time

import torch
from torchvision import datasets, transforms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    transform = transforms.Compose([transforms.Resize([a.image_size, a.image_size]), transforms.PILToTensor()])
    folder = datasets.ImageFolder(a.root, transform=transform)
    subset = torch.utils.data.Subset(folder, range(min(a.limit or len(folder), len(folder))))
    loader = torch.utils.data.DataLoader(subset, batch_size=a.batch_size, num_workers=a.workers)
    epochs = []
    for _ in range(2):
        started = time.perf_counter()
        n = sum(len(labels) for _, labels in loader)
        epochs.append(time.perf_counter() - started)
    print(json.dumps({
        "implementation": "torchvision", "kind": "data", "folder": a.root, "images": n, "image_size": a.image_size,
        "threads": a.workers, "decode_seconds": epochs[0], "decode_images_per_s": n / epochs[0],
        "batch_size": a.batch_size, "epoch_gather_ms": epochs[1] * 1e3, "epochs": 1,
    }))


if __name__ == "__main__":
    main()
