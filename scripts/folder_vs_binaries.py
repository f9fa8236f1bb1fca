"""Whether an image folder and a CIFAR-10 binary layout hold the same images: csp-tch decodes the folder
(`data check --dataset folder`, at 32 px so nothing is resized) into a fresh cache, and each split's
(label, pixels) pairs are compared with the binary records as multisets (the two keep different orders).
For ../shared/data: the JPEG tree and what make-cifar10-bin decoded from it with Pillow.

    python folder_vs_binaries.py CSP_TCH FOLDER BINARY_DIR
"""
import glob
import hashlib
import json
import subprocess
import sys
import tempfile

import numpy as np


def records(paths):
    raw = np.concatenate([np.fromfile(p, np.uint8).reshape(-1, 3073) for p in paths])
    return raw[:, 0].astype(np.int64), raw[:, 1:]


def multiset(labels, pixels):
    return sorted(hashlib.md5(bytes([int(l)]) + p.tobytes()).hexdigest() for l, p in zip(labels, pixels))


def main(csp_tch, folder, binaries):
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([csp_tch, "data", "check", "--dataset", "folder", "--data-dir", folder, "--val-split", "test",
                        "--image-size", "32", "--cache-dir", cache], check=True, stdout=subprocess.DEVNULL)
        decoded = {}
        for d in glob.glob(f"{cache}/images-*"):
            meta = json.load(open(f"{d}/meta.json"))
            n = len(meta["labels"])
            decoded[n] = (np.array(meta["labels"]), np.fromfile(f"{d}/pixels.u8", np.uint8).reshape(n, -1))
    splits = {"train": [f"{binaries}/data_batch_{i}.bin" for i in range(1, 6)], "test": [f"{binaries}/test_batch.bin"]}
    same = True
    for name, paths in splits.items():
        labels, pixels = records(paths)
        ours = decoded.get(len(labels))
        equal = ours is not None and ours[1].shape == pixels.shape and multiset(*ours) == multiset(labels, pixels)
        print(f"{name}: {len(labels)} records; the folder's decoded images {'equal them' if equal else 'DIFFER'} "
              "(label and every pixel, as multisets)")
        same &= equal
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
