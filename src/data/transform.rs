//! The tutorial's per-batch transform, run on the training device: gather the uint8 images of a
//! batch, resize them, normalise.

use tch::{Kind, Tensor};

use crate::config::Normalize;

/// Resizes uint8-valued float images `[N, 3, H, W]` to `size` x `size` as PIL's bilinear resize
/// does when enlarging (the only direction csp-tch needs: every model wants at least 32 px):
/// half-pixel centres, edge pixels replicated, and PIL's two passes — horizontal, then vertical —
/// each rounded half up to an 8-bit image.
pub fn resize(images: &Tensor, size: i64) -> Tensor {
    let [.., h, w] = images.size()[..] else { panic!("resize expects NCHW images") };
    if (h, w) == (size, size) {
        return images.shallow_clone();
    }
    assert!(size >= h && size >= w, "resize only enlarges ({h}x{w} -> {size})");
    let to_u8 = |t: Tensor| (t + 0.5).floor().clamp(0.0, 255.0);
    // An unchanged axis samples its own pixel centres: upsampling leaves it as it is.
    let wide = to_u8(images.upsample_bilinear2d([h, size], false, None, None));
    to_u8(wide.upsample_bilinear2d([size, size], false, None, None))
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
