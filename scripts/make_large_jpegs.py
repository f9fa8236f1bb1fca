"""A benchmark folder of Flowers-sized JPEGs made from a CIFAR-10 image folder: each of the first
LIMIT training images (torchvision's order) enlarged with Pillow's bicubic filter to 500x375 (or
--size) and saved at JPEG quality 90 into OUT/train/<class>/, the layout `csp-tch data bench` and
`scripts/bench.sh --data-folder` read.

    python make_large_jpegs.py CIFAR_FOLDER OUT [--limit 2000] [--size 500x375]
"""
import argparse
import os

from PIL import Image
from torchvision import datasets


def main():
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--size", default="500x375")
    a = p.parse_args()
    width, height = (int(v) for v in a.size.split("x"))
    folder = datasets.ImageFolder(os.path.join(a.source, "train"))
    for path, label in folder.samples[: a.limit]:
        target = os.path.join(a.out, "train", folder.classes[label])
        os.makedirs(target, exist_ok=True)
        with Image.open(path) as image:
            large = image.convert("RGB").resize((width, height), Image.BICUBIC)
        large.save(os.path.join(target, os.path.basename(path)), quality=90)


if __name__ == "__main__":
    main()
