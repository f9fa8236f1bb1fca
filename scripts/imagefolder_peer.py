"""torchvision's reading of an image folder, for csp-tch's peer test (tests/datasets.rs).

    python imagefolder_peer.py ROOT SIZE OUT

Writes OUT.json (torchvision's classes and samples: path and label, in its order) and OUT.u8 (every
sample through `Resize([SIZE, SIZE])` on the PIL image `ImageFolder` loads, as uint8 [N, 3, SIZE,
SIZE]), which the test compares with what csp-tch decodes from the same folder.
"""

import json
import sys

import numpy as np
from torchvision import datasets, transforms


def main():
    root, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resize = transforms.Resize([size, size])
    folder = datasets.ImageFolder(root, transform=lambda img: np.asarray(resize(img)))
    with open(out + ".u8", "wb") as f:
        for i in range(len(folder)):
            image, _ = folder[i]
            f.write(np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes())
    with open(out + ".json", "w") as f:
        json.dump({"classes": folder.classes, "samples": folder.samples}, f)


if __name__ == "__main__":
    main()
