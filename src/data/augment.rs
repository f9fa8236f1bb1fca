//! `--aug`: training-time augmentation on the device, before the batch's resize.
//!
//! The random draws are counter-based: each is a hash of (seed, batch number, image in the batch,
//! which draw), computed with integer tensor ops on the device. So a batch's draws are a function
//! of its place in the run alone: a CUDA graph replayed for batch k reads k from a device scalar
//! and draws anew, a resumed run draws what an uninterrupted one drew without any generator state,
//! and the CPU and a GPU draw the same numbers (integer arithmetic is exact on both; no product
//! here exceeds 2^49, so nothing relies on overflow).

use tch::{Device, Kind, Tensor};

use super::resample;
use super::transform::clip8;
use crate::config::Augment;

/// CIFAR's `RandomCrop(size, padding=4)`.
pub const CROP_PADDING: i64 = 4;

const MASK32: i64 = 0xFFFF_FFFF;

/// `x * c mod 2^32` for `x` in `0..2^32`, in halves so that no product leaves int64.
fn mul32(x: &Tensor, c: u32) -> Tensor {
    let (hi, lo) = (i64::from(c >> 16), i64::from(c & 0xFFFF));
    let high = (x * hi).bitwise_and(0xFFFF) * 65536;
    (x * lo + high).bitwise_and(MASK32)
}

/// Chris Wellons' `lowbias32` integer hash of 32-bit values held in int64.
fn hash32(x: &Tensor) -> Tensor {
    let x = x.bitwise_and(MASK32);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = mul32(&x, 0x7feb_352d);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = mul32(&x, 0x846c_a68b);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// 24 random bits (`0..2^24`, int64) per image of a batch of `images`, for draw number `draw` of
/// batch `counter` (an int64 scalar on the device) of a run seeded `seed`.
pub fn random_bits(seed: u64, counter: &Tensor, images: i64, draw: u32) -> Tensor {
    let device = counter.device();
    let stream = (seed as i64 ^ (seed >> 32) as i64).wrapping_mul(0x9E37).wrapping_add(i64::from(draw)) & MASK32;
    // Made on the device (a fill, not an upload), so that a CUDA graph can record it.
    let stream = hash32(&Tensor::full([], stream, (Kind::Int64, device)));
    let batch = hash32(&(stream + counter));
    let index = Tensor::arange(images, (Kind::Int64, device));
    hash32(&(batch + index)).bitwise_right_shift_tensor_scalar(8)
}

/// A whole number in `0..n` from 24 random bits (each value `2^24 / n` times, to within one).
fn below(bits: &Tensor, n: i64) -> Tensor {
    (bits * n).bitwise_right_shift_tensor_scalar(24)
}

/// One batch's draws: crop offsets (0 without a crop) and whether each image is mirrored.
pub struct Draws {
    pub top: Tensor,
    pub left: Tensor,
    pub flip: Tensor,
}

/// The draws of `how` for batch `counter` of `images` images (crop-flip's offsets; flip's alone).
pub fn draws(how: Augment, seed: u64, counter: &Tensor, images: i64) -> Draws {
    let device = counter.device();
    let flip = random_bits(seed, counter, images, 0).lt(1 << 23);
    let (top, left) = match how {
        Augment::CropFlip => {
            let offsets = 2 * CROP_PADDING + 1;
            (
                below(&random_bits(seed, counter, images, 1), offsets),
                below(&random_bits(seed, counter, images, 2), offsets),
            )
        }
        Augment::None | Augment::Flip | Augment::RrcFlip => {
            let zeros = Tensor::zeros([images], (Kind::Int64, device));
            (zeros.shallow_clone(), zeros)
        }
    };
    Draws { top, left, flip }
}

/// torchvision's `RandomResizedCrop` defaults: the crop's share of the area and its aspect ratio.
pub const RRC_SCALE: (f64, f64) = (0.08, 1.0);
pub const RRC_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// `get_params`' tries before it falls back to a centre crop.
pub const RRC_TRIES: u32 = 10;

/// The random numbers of `RandomResizedCrop.get_params` for one batch: per try, the area share and
/// the log aspect ratio (float32 `[N, 10]`, what `torch.empty(1).uniform_(a, b)` would have handed
/// it), and 24 random bits for each of the two `randint`s of the try that fits.
pub struct RrcDraws {
    pub scales: Tensor,
    pub log_ratios: Tensor,
    pub top_bits: Tensor,
    pub left_bits: Tensor,
    pub flip: Tensor,
}

/// `a + (b - a) * u` in float32 for each try, from draws `first..first + 10`.
fn uniform_tries(seed: u64, counter: &Tensor, images: i64, first: u32, (a, b): (f32, f32)) -> Tensor {
    let tries: Vec<Tensor> = (first..first + RRC_TRIES)
        .map(|d| random_bits(seed, counter, images, d).to_kind(Kind::Float) * (1.0 / f64::from(1u32 << 24)))
        .collect();
    Tensor::stack(&tries, 1) * f64::from(b - a) + f64::from(a)
}

/// `RandomResizedCrop`'s bounds of the log aspect ratio: `torch.log(torch.tensor(ratio))`, float32.
pub fn rrc_log_ratio_bounds() -> (f32, f32) {
    let bounds = Vec::<f32>::try_from(Tensor::from_slice(&[RRC_RATIO.0 as f32, RRC_RATIO.1 as f32]).log()).unwrap();
    (bounds[0], bounds[1])
}

/// The RandomResizedCrop draws of batch `counter`.
pub fn rrc_draws(seed: u64, counter: &Tensor, images: i64) -> RrcDraws {
    RrcDraws {
        scales: uniform_tries(seed, counter, images, 3, (RRC_SCALE.0 as f32, RRC_SCALE.1 as f32)),
        log_ratios: uniform_tries(seed, counter, images, 3 + RRC_TRIES, rrc_log_ratio_bounds()),
        top_bits: random_bits(seed, counter, images, 1),
        left_bits: random_bits(seed, counter, images, 2),
        flip: random_bits(seed, counter, images, 0).lt(1 << 23),
    }
}

/// Crop boxes, one per image: first row, first column, height, width (int64 `[N]` each).
pub struct Boxes {
    pub top: Tensor,
    pub left: Tensor,
    pub height: Tensor,
    pub width: Tensor,
}

/// `RandomResizedCrop.get_params` on `height` x `width` images for every image of a batch at once:
/// the first of the ten tries whose box fits, its place from the `randint` draws, else the centre
/// crop of the fallback. Box sides are `int(round(sqrt(...)))` in float64 with ties to even, as
/// Python's `round`.
pub fn rrc_boxes(height: i64, width: i64, d: &RrcDraws) -> Boxes {
    let target = d.scales.to_kind(Kind::Double) * (height * width) as f64;
    let aspect = d.log_ratios.exp().to_kind(Kind::Double);
    let w = (&target * &aspect).sqrt().round().to_kind(Kind::Int64);
    let h = (&target / &aspect).sqrt().round().to_kind(Kind::Int64);
    let fits = w.gt(0).logical_and(&w.le(width)).logical_and(&h.gt(0)).logical_and(&h.le(height));
    let chosen = fits.to_kind(Kind::Int64).argmax(1, true);
    let fitted = fits.any_dim(1, false);
    let (h, w) = (h.gather(1, &chosen, false).squeeze_dim(1), w.gather(1, &chosen, false).squeeze_dim(1));
    let top = below_n(&d.top_bits, &(-&h + height + 1));
    let left = below_n(&d.left_bits, &(-&w + width + 1));
    let (fh, fw) = rrc_fallback(height, width);
    let pick = |v: Tensor, f: i64| v.where_self(&fitted, &Tensor::full_like(&v, f));
    Boxes {
        top: pick(top, (height - fh) / 2),
        left: pick(left, (width - fw) / 2),
        height: pick(h, fh),
        width: pick(w, fw),
    }
}

/// `randint(0, n)` from 24 random bits, for a whole number `n` per image.
fn below_n(bits: &Tensor, n: &Tensor) -> Tensor {
    (bits * n).bitwise_right_shift_tensor_scalar(24)
}

/// The box of `get_params`' fallback: the whole image, cut to the nearest allowed aspect ratio.
fn rrc_fallback(height: i64, width: i64) -> (i64, i64) {
    let in_ratio = width as f64 / height as f64;
    let (lo, hi) = RRC_RATIO;
    if in_ratio < lo {
        ((width as f64 / lo).round_ties_even() as i64, width)
    } else if in_ratio > hi {
        (height, (height as f64 * hi).round_ties_even() as i64)
    } else {
        (height, width)
    }
}

/// Pillow's bilinear weights for each image's crop `[offset, offset + len)` of an axis `full`
/// pixels long resized to `out` pixels, as dense fixed-point `[N, out, full]` float64 matrices:
/// [`resample::coefficients`] computed on the device with the same float64 operations in the same
/// order (the window's sum taken tap by tap, as Pillow's loop does).
fn crop_weights(offset: &Tensor, len: &Tensor, full: i64, out: i64) -> Tensor {
    let device = len.device();
    let n = len.size()[0];
    let in_size = len.to_kind(Kind::Double).view([n, 1]);
    let scale = &in_size / out as f64;
    let filter_scale = scale.clamp_min(1.0);
    let xx = Tensor::arange(out, (Kind::Double, device)).view([1, out]);
    let center = (xx + 0.5) * &scale;
    let xmin = (&center - &filter_scale + 0.5).trunc().clamp_min(0.0);
    let xmax = (&center + &filter_scale + 0.5).trunc().minimum(&in_size);
    // Pillow's ksize for the widest window any crop of this axis can have.
    let taps = (full as f64 / out as f64).max(1.0).ceil() as i64 * 2 + 1;
    let k = Tensor::arange(taps, (Kind::Double, device)).view([1, 1, taps]);
    let x = xmin.unsqueeze(2) + k;
    let inside = x.lt_tensor(&xmax.unsqueeze(2)).to_kind(Kind::Double);
    let reciprocal = filter_scale.reciprocal().unsqueeze(2);
    let distance = ((&x - center.unsqueeze(2) + 0.5) * reciprocal).abs();
    // Pillow's triangle, 1 - |x| inside the support.
    let raw = (distance.neg() + 1.0).clamp_min(0.0) * inside;
    let mut total = Tensor::zeros([n, out], (Kind::Double, device));
    for tap in 0..taps {
        total = total + raw.select(2, tap);
    }
    let total = total.unsqueeze(2);
    let normalised = (&raw / &total).where_self(&total.ne(0.0), &raw);
    let fixed = (normalised * f64::from(1u32 << resample::PRECISION_BITS) + 0.5).trunc();
    let column = (x + offset.to_kind(Kind::Double).view([n, 1, 1])).clamp(0.0, (full - 1) as f64).to_kind(Kind::Int64);
    Tensor::zeros([n, out, full], (Kind::Double, device)).scatter_add(2, &column, &fixed)
}

/// Each image's box of `pixels` (uint8-valued float `[N, C, H, W]`) resized to `size` x `size` as
/// torchvision's `resized_crop` on a PIL image (crop, then Pillow's bilinear resize with its pass
/// order chosen per image), mirrored where `flip` (a mirror of the horizontal weights, which is the
/// mirror of the result).
pub fn resized_crop(pixels: &Tensor, boxes: &Boxes, flip: &Tensor, size: i64) -> Tensor {
    let [n, _, h, w] = pixels.size()[..] else { panic!("resized_crop expects NCHW images") };
    let across = crop_weights(&boxes.left, &boxes.width, w, size);
    let across = across.flip([1]).where_self(&flip.view([n, 1, 1]), &across);
    let down = crop_weights(&boxes.top, &boxes.height, h, size).unsqueeze(1);
    let across = across.transpose(1, 2).unsqueeze(1);
    let x = pixels.to_kind(Kind::Double);
    let horizontal_first = clip8(down.matmul(&clip8(x.matmul(&across))));
    let vertical_first = clip8(clip8(down.matmul(&x)).matmul(&across));
    // Pillow 13's rule ([`resample::vertical_first`]), per image.
    let shrink_y = &boxes.height - size;
    let vertical = shrink_y.gt(0).logical_and(&shrink_y.gt_tensor(&((&boxes.width - size) * 2)));
    vertical_first.where_self(&vertical.view([n, 1, 1, 1]), &horizontal_first).to_kind(Kind::Float)
}

/// `pixels` (`[N, C, H, W]`, float) with `draws` applied as torchvision would: zero padding of
/// [`CROP_PADDING`] on every side (with a crop), the `H x W` window at `(top, left)`, then a mirror
/// where `flip`; one gather from the padded batch.
pub fn apply(pixels: &Tensor, how: Augment, draws: &Draws) -> Tensor {
    let [n, c, h, w] = pixels.size()[..] else { panic!("augment expects NCHW images") };
    let device = pixels.device();
    let pad = if how == Augment::CropFlip { CROP_PADDING } else { 0 };
    let padded = pixels.constant_pad_nd([pad, pad, pad, pad]);
    let (ph, pw) = (h + 2 * pad, w + 2 * pad);
    let rows = draws.top.view([n, 1]) + Tensor::arange(h, (Kind::Int64, device)).view([1, h]);
    let columns = Tensor::arange(w, (Kind::Int64, device)).view([1, w]);
    let mirrored = columns.flip([1]);
    let columns = draws.left.view([n, 1]) + columns.where_self(&draws.flip.logical_not().view([n, 1]), &mirrored);
    let index = (rows.view([n, h, 1]) * pw + columns.view([n, 1, w])).view([n, 1, h * w]).expand([n, c, h * w], false);
    padded.view([n, c, ph * pw]).gather(2, &index, false).view([n, c, h, w])
}

/// A batch counter on `device`, for [`draws`]: written before every step, read by the recorded one.
pub fn counter(device: Device) -> Tensor {
    Tensor::zeros([], (Kind::Int64, device))
}
