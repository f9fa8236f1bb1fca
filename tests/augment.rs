//! `--aug` on the device: its draws over many batches within binomial bounds, and its output on
//! known images equal to torchvision's transforms given the same crop and flip.

mod common;

use common::peer::{read_f32, run_python, write_f32};
use csp_tch::config::Augment;
use csp_tch::data::augment::{self, CROP_PADDING};
use tch::{Device, Kind, Tensor};

fn counter(k: i64) -> Tensor {
    Tensor::from(k)
}

fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64)).unwrap()
}

/// Asserts that `hits` of `n` draws is within 4.5 standard deviations of a probability `p`.
fn within_binomial(hits: usize, n: usize, p: f64, what: &str) {
    let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
    assert!((hits as f64 - mean).abs() <= 4.5 * sd, "{what}: {hits} of {n}, expected {mean:.0} +- {:.0}", 4.5 * sd);
}

#[test]
fn flips_and_crop_offsets_are_uniform_independent_and_reproducible() {
    let (batches, images) = (400, 64);
    let (mut flips, mut tops, mut lefts, mut pairs) = (0usize, [0usize; 9], [0usize; 9], vec![0usize; 81]);
    let mut first_images = Vec::new();
    for k in 0..batches {
        let d = augment::draws(Augment::CropFlip, 7, &counter(k), images);
        let (top, left, flip) = (ints(&d.top), ints(&d.left), ints(&d.flip));
        for i in 0..images as usize {
            flips += flip[i] as usize;
            tops[top[i] as usize] += 1;
            lefts[left[i] as usize] += 1;
            pairs[(top[i] * 9 + left[i]) as usize] += 1;
        }
        first_images.push((top[0], left[0], flip[0]));
    }
    let n = (batches * images) as usize;
    within_binomial(flips, n, 0.5, "flips");
    for v in 0..9 {
        within_binomial(tops[v], n, 1.0 / 9.0, &format!("top {v}"));
        within_binomial(lefts[v], n, 1.0 / 9.0, &format!("left {v}"));
    }
    // Top and left drawn independently: every pair as often as 1/81 says.
    for (cell, &hits) in pairs.iter().enumerate() {
        within_binomial(hits, n, 1.0 / 81.0, &format!("pair {cell}"));
    }
    // The first image of every batch is not drawn alike: the counter moves the draws.
    first_images.sort();
    first_images.dedup();
    assert!(first_images.len() > 100, "{} distinct draws for image 0 over {batches} batches", first_images.len());
    // A function of (seed, batch) alone: the same again, another for another seed.
    let again = augment::draws(Augment::CropFlip, 7, &counter(3), images);
    let same = augment::draws(Augment::CropFlip, 7, &counter(3), images);
    let other = augment::draws(Augment::CropFlip, 8, &counter(3), images);
    assert_eq!(ints(&again.left), ints(&same.left));
    assert_ne!(ints(&again.left), ints(&other.left));
    // Flip alone never crops.
    let flip_only = augment::draws(Augment::Flip, 7, &counter(3), images);
    assert!(ints(&flip_only.top).iter().chain(&ints(&flip_only.left)).all(|&v| v == 0));
    assert_eq!(ints(&flip_only.flip), ints(&again.flip), "the flip is the same draw with or without a crop");
}

#[test]
fn crops_and_flips_equal_torchvisions_pad_crop_and_hflip() {
    let tmp = tempfile::tempdir().unwrap();
    // A square batch and a non-square one, of uint8 values.
    let batches = [(8i64, 32i64, 32i64), (5, 20, 28)];
    let mut script = String::from(
        r#"
import sys, numpy as np, torch
import torchvision.transforms.v2.functional as F
d = sys.argv[1]
def run(k, n, h, w, pad):
    x = torch.from_numpy(np.fromfile(f"{d}/x{k}", np.float32).reshape(n, 3, h, w)).to(torch.uint8)
    top = np.fromfile(f"{d}/top{k}", np.float32).astype(int)
    left = np.fromfile(f"{d}/left{k}", np.float32).astype(int)
    flip = np.fromfile(f"{d}/flip{k}", np.float32).astype(bool)
    out = []
    for i in range(n):
        img = F.pad(x[i], [pad], fill=0) if pad else x[i]
        img = F.crop(img, int(top[i]), int(left[i]), h, w)
        out.append(F.horizontal_flip(img) if flip[i] else img)
    torch.stack(out).float().numpy().tofile(f"{d}/out{k}")
"#,
    );
    let mut cases = Vec::new();
    for (k, &(n, h, w)) in batches.iter().enumerate() {
        for (j, how) in [Augment::CropFlip, Augment::Flip].into_iter().enumerate() {
            let case = 2 * k + j;
            let x = {
                let _rng = common::rng_turn();
                tch::manual_seed(case as i64);
                Tensor::randint(256, [n, 3, h, w], (Kind::Float, Device::Cpu))
            };
            let d = augment::draws(how, 11, &counter(case as i64 + 40), n);
            write_f32(&tmp.path().join(format!("x{case}")), &x);
            write_f32(&tmp.path().join(format!("top{case}")), &d.top.to_kind(Kind::Float));
            write_f32(&tmp.path().join(format!("left{case}")), &d.left.to_kind(Kind::Float));
            write_f32(&tmp.path().join(format!("flip{case}")), &d.flip.to_kind(Kind::Float));
            let pad = if how == Augment::CropFlip { CROP_PADDING } else { 0 };
            script += &format!("run({case}, {n}, {h}, {w}, {pad})\n");
            cases.push((case, augment::apply(&x, how, &d), x, d));
        }
    }
    run_python(&script, tmp.path());
    for (case, ours, x, d) in cases {
        let theirs = read_f32(&tmp.path().join(format!("out{case}")));
        assert_eq!(Vec::<f32>::try_from(ours.flatten(0, -1)).unwrap(), theirs, "case {case}");
        assert!(!ours.equal(&x), "case {case}: the batch changed");
        assert!(ints(&d.flip).contains(&1) && ints(&d.flip).contains(&0), "case {case}: both flipped and kept");
    }
}

/// `RandomResizedCrop.get_params` of torchvision itself, its `torch.empty(1).uniform_` and
/// `torch.randint` fed with csp-tch's numbers (written by the test), and `resized_crop` on PIL images.
const RRC_PEER: &str = r#"
import sys, numpy as np, torch
from PIL import Image
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode, RandomResizedCrop
d = sys.argv[1]
real_empty, real_randint = torch.empty, torch.randint
def run(k, n, h, w, size):
    scales = np.fromfile(f"{d}/scales{k}", np.float32).reshape(n, 10)
    ratios = np.fromfile(f"{d}/ratios{k}", np.float32).reshape(n, 10)
    bits = np.fromfile(f"{d}/bits{k}", np.float32).astype(np.int64).reshape(2, n)
    x = np.fromfile(f"{d}/x{k}", np.float32).astype(np.uint8).reshape(n, 3, h, w)
    flip = np.fromfile(f"{d}/flip{k}", np.float32).astype(bool)
    boxes, out, fell_back = [], [], 0
    for i in range(n):
        uniforms = iter([v for t in range(10) for v in (scales[i, t], ratios[i, t])])
        randints = iter(bits[:, i])
        class Draw:
            def uniform_(self, a, b):
                return torch.tensor([next(uniforms)], dtype=torch.float32)
        calls = []
        def randint(low, high, size):
            calls.append(high)
            return torch.tensor([(int(next(randints)) * high) >> 24])
        torch.empty = lambda *a, **kw: Draw()
        torch.randint = randint
        img = Image.fromarray(x[i].transpose(1, 2, 0))
        box = RandomResizedCrop.get_params(img, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        torch.empty, torch.randint = real_empty, real_randint
        fell_back += not calls
        boxes.append(box)
        crop = F.resized_crop(img, *box, [size, size], InterpolationMode.BILINEAR)
        out.append(np.asarray(F.hflip(crop) if flip[i] else crop).transpose(2, 0, 1))
    np.array(boxes, np.float32).tofile(f"{d}/boxes{k}")
    np.stack(out).astype(np.float32).tofile(f"{d}/out{k}")
    np.array([fell_back], np.float32).tofile(f"{d}/fallbacks{k}")
"#;

#[test]
fn random_resized_crops_are_torchvisions_boxes_and_pillows_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    // Stored sizes (h, w) and output sizes: square, a strip too wide for most boxes (the fallback),
    // and a tall one whose boxes shrink more in height than width (Pillow's vertical pass first).
    let cases = [(32i64, 32i64, 24i64), (10, 40, 12), (40, 24, 16), (20, 20, 48)];
    let n = 24;
    let mut script = RRC_PEER.to_string();
    let mut ours = Vec::new();
    for (k, &(h, w, size)) in cases.iter().enumerate() {
        let x = {
            let _rng = common::rng_turn();
            tch::manual_seed(k as i64);
            Tensor::randint(256, [n, 3, h, w], (Kind::Float, Device::Cpu))
        };
        let d = augment::rrc_draws(5, &counter(k as i64 * 13), n);
        let boxes = augment::rrc_boxes(h, w, &d);
        let out = augment::resized_crop(&x, &boxes, &d.flip, size);
        assert_eq!(out.size(), vec![n, 3, size, size]);
        write_f32(&tmp.path().join(format!("x{k}")), &x);
        write_f32(&tmp.path().join(format!("scales{k}")), &d.scales);
        write_f32(&tmp.path().join(format!("ratios{k}")), &d.log_ratios);
        write_f32(
            &tmp.path().join(format!("bits{k}")),
            &Tensor::stack(&[&d.top_bits, &d.left_bits], 0).to_kind(Kind::Float),
        );
        write_f32(&tmp.path().join(format!("flip{k}")), &d.flip.to_kind(Kind::Float));
        script += &format!("run({k}, {n}, {h}, {w}, {size})\n");
        ours.push((boxes, out));
    }
    run_python(&script, tmp.path());
    for (k, (boxes, out)) in ours.iter().enumerate() {
        let theirs: Vec<i64> = read_f32(&tmp.path().join(format!("boxes{k}"))).iter().map(|&v| v as i64).collect();
        let mine: Vec<i64> =
            ints(&Tensor::stack(&[&boxes.top, &boxes.left, &boxes.height, &boxes.width], 1).flatten(0, -1));
        assert_eq!(mine, theirs, "case {k}: boxes (top, left, height, width)");
        let pixels = read_f32(&tmp.path().join(format!("out{k}")));
        let diff: Vec<f32> =
            Vec::<f32>::try_from(out.flatten(0, -1)).unwrap().iter().zip(&pixels).map(|(a, b)| (a - b).abs()).collect();
        let worst = diff.iter().fold(0f32, |m, &v| m.max(v));
        assert_eq!(worst, 0.0, "case {k}: pixels differ from Pillow's by up to {worst}");
    }
    let fallbacks = read_f32(&tmp.path().join("fallbacks1"))[0];
    assert!(fallbacks > 0.0, "the wide strip falls back to the centre crop at least once");
    let (h, w) = (&ours[2].0.height, &ours[2].0.width);
    let vertical = (h - 16).gt(0).logical_and(&(h - 16).gt_tensor(&((w - 16) * 2)));
    let count = ints(&vertical).iter().sum::<i64>();
    assert!(count > 0 && count < n, "both of Pillow's pass orders occur: {count} of {n} vertical first");
}
