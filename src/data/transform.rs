//! The tutorial's per-batch transform, run on the training device: gather the uint8 images of a
//! batch, resize them, normalise.

use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

use super::{augment, resample};
use crate::config::{Augment, Normalize};

/// Pillow's fixed-point weights from `in_size` to `out_size` pixels as a dense `[out, in]` float64
/// matrix on `device`, made once per shape and device and kept: a step recorded as a CUDA graph then
/// finds it in place (made during the eager warm-up steps; no upload inside a capture).
fn weight_matrix(in_size: i64, out_size: i64, device: Device) -> Tensor {
    type Key = (i64, i64, Device);
    static MATRICES: Mutex<Vec<(Key, Tensor)>> = Mutex::new(Vec::new());
    let key = (in_size, out_size, device);
    let mut kept = MATRICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = kept.iter().find(|(k, _)| *k == key) {
        return m.shallow_clone();
    }
    let c = resample::coefficients(in_size as usize, out_size as usize);
    let mut dense = vec![0f64; (in_size * out_size) as usize];
    for (row, (&first, weights)) in c.first.iter().zip(&c.weights).enumerate() {
        for (i, &w) in weights.iter().enumerate() {
            dense[row * in_size as usize + first + i] = f64::from(w);
        }
    }
    let matrix = Tensor::from_slice(&dense).view([out_size, in_size]).to_device(device);
    kept.push((key, matrix.shallow_clone()));
    matrix
}

/// Pillow's rounding of a fixed-point sum to 8 bits: `(sum + 2^21) >> 22`, clamped.
pub(crate) fn clip8(sums: Tensor) -> Tensor {
    let one = f64::from(1u32 << resample::PRECISION_BITS);
    ((sums + one / 2.0) / one).floor().clamp(0.0, 255.0)
}

/// Resizes uint8-valued float images `[N, 3, H, W]` to `size` x `size` exactly as Pillow's
/// `Image.resize((size, size), BILINEAR)` does ([`resample`], whose fixed-point weights it applies
/// as matrices): a horizontal and a vertical pass in Pillow's order, each rounded to 8 bits. The sums are of
/// integers below 2^53, so float64 holds them exactly whatever the order of summation.
pub fn resize(images: &Tensor, size: i64) -> Tensor {
    let [.., h, w] = images.size()[..] else { panic!("resize expects NCHW images") };
    if (h, w) == (size, size) {
        return images.shallow_clone();
    }
    let device = images.device();
    let across = |x: Tensor| if w != size { clip8(x.matmul(&weight_matrix(w, size, device).tr())) } else { x };
    let down = |x: Tensor| if h != size { clip8(weight_matrix(h, size, device).matmul(&x)) } else { x };
    let x = images.to_kind(Kind::Double);
    let x = if resample::vertical_first(w as usize, h as usize, size as usize, size as usize) {
        across(down(x))
    } else {
        down(across(x))
    };
    x.to_kind(Kind::Float)
}

/// Applies a normalisation to float pixels in 0..255.
pub fn normalize(pixels: &Tensor, how: Normalize) -> Tensor {
    match how {
        Normalize::Tutorial => (pixels - 0.5) / 0.5,
        Normalize::Unit => (pixels / 255.0 - 0.5) / 0.5,
    }
}

/// The same NCHW tensor with channels-last (NHWC) strides, the layout libtorch's convolutions
/// recognise as channels-last.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// The model input for the images at `index` of a uint8 `[N, 3, 32, 32]` tensor held on the device.
pub fn batch(images: &Tensor, index: &Tensor, size: i64, how: Normalize) -> Tensor {
    let pixels = images.index_select(0, index).to_kind(Kind::Float);
    normalize(&resize(&pixels, size), how)
}

/// The side `--eval-crop-pct` resizes to before its centre crop: timm's `floor(size / crop_pct)`.
pub fn eval_resize_size(size: i64, crop_pct: f64) -> i64 {
    (size as f64 / crop_pct).floor() as i64
}

/// [`batch`] for evaluation with `--eval-crop-pct`: resized (Pillow's bilinear, to a square) to
/// [`eval_resize_size`], then torchvision's `CenterCrop(size)` (its offsets rounded half to even, as
/// Python's `round`).
pub fn center_crop_batch(images: &Tensor, index: &Tensor, size: i64, how: Normalize, crop_pct: f64) -> Tensor {
    let pixels = images.index_select(0, index).to_kind(Kind::Float);
    let resized = resize(&pixels, eval_resize_size(size, crop_pct));
    let [.., h, w] = resized.size()[..] else { panic!("a batch of NCHW images") };
    let offset = |side: i64| ((side - size) as f64 / 2.0).round_ties_even() as i64;
    normalize(&resized.narrow(2, offset(h), size).narrow(3, offset(w), size), how)
}

/// [`batch`] with `--aug` applied to the gathered images before the resize: the draws of batch
/// `counter` of a run seeded `seed` ([`augment::draws`]).
pub fn augmented_batch(
    images: &Tensor,
    index: &Tensor,
    size: i64,
    how: Normalize,
    aug: Augment,
    seed: u64,
    counter: &Tensor,
) -> Tensor {
    let pixels = images.index_select(0, index).to_kind(Kind::Float);
    let [n, _, h, w] = pixels.size()[..] else { panic!("a batch of NCHW images") };
    let augmented = if aug == Augment::RrcFlip {
        let draws = augment::rrc_draws(seed, counter, n);
        augment::resized_crop(&pixels, &augment::rrc_boxes(h, w, &draws), &draws.flip, size)
    } else {
        resize(&augment::apply(&pixels, aug, &augment::draws(aug, seed, counter, n)), size)
    };
    normalize(&augmented, how)
}
