//! Image files to 8-bit RGB exactly as Pillow's `Image.open(f).convert("RGB")` gives them.
//!
//! JPEGs go through libjpeg-turbo's decoder (the `mozjpeg` crate's build of it, the decoder Pillow's
//! wheels bundle; defaults as Pillow's: islow IDCT, fancy upsampling), which gives Pillow's pixels to
//! the bit (measured on CIFAR-10's JPEGs). Every other format goes through the `image` crate, with
//! Pillow's conversions applied here: grey replicated, alpha dropped, palettes expanded, 16-bit
//! colour to its high byte, 16-bit grey clipped at 255 (Pillow's `I;16` to `RGB`), CMYK as
//! Pillow's `cmyk2rgb`.

use anyhow::{anyhow, bail, Result};
use image::DynamicImage;

/// A decoded image: interleaved RGB, row-major.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// The extensions torchvision's `ImageFolder` accepts (compared lower-cased).
pub const EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

extern "C" {
    // libjpeg-turbo's own test of its SIMD kernels (in the library mozjpeg-sys builds either way:
    // from `jsimd.c` when it was built with nasm, from `jsimd_none.c`, always 0, without).
    fn jsimd_can_idct_islow() -> std::os::raw::c_int;
}

/// Whether JPEGs decode through libjpeg-turbo's SIMD kernels: built with them (nasm found at build
/// time, see scripts/setup.sh) and this CPU has them. Either way the pixels are the same.
pub fn jpeg_simd() -> bool {
    // SAFETY: takes no arguments; reads the CPU's features once.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// Decodes an image file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Rgb> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(bytes);
    }
    let image = image::load_from_memory(bytes).map_err(|err| anyhow!("{err}"))?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels = match image {
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        DynamicImage::ImageRgba8(rgba) => rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(grey) => grey.iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(grey) => grey.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(grey) => grey.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(grey) => grey.chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect(),
        DynamicImage::ImageRgb16(rgb) => rgb.iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(rgba) => {
            rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8)).collect()
        }
        other => bail!("unsupported pixel format {:?}", other.color()),
    };
    Ok(Rgb { width, height, pixels })
}

/// Pillow's `cmyk2rgb`: each channel `(255 - k) - c * (255 - k) / 255`, the product rounded as its
/// `MULDIV255` does.
fn cmyk_to_rgb(c: u8, k: u8) -> u8 {
    let nk = 255 - i32::from(k);
    let t = i32::from(c) * nk + 128;
    (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
}

/// Whether a JPEG carries an Adobe APP14 segment, whose CMYK data are stored inverted (Pillow reads
/// such files as `CMYK;I`).
fn has_adobe_marker(bytes: &[u8]) -> bool {
    let mut at = 2;
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        if marker == 0xEE && bytes[at + 4..].starts_with(b"Adobe") {
            return true;
        }
        if marker == 0xDA {
            return false;
        }
        at += 2 + len;
    }
    false
}

fn decode_jpeg(bytes: &[u8]) -> Result<Rgb> {
    // libjpeg's fatal errors unwind out of the decoder (without the panic hook); caught here.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Rgb> {
        let jpeg = mozjpeg::Decompress::new_mem(bytes)?;
        let (width, height) = jpeg.size();
        let cmyk = matches!(jpeg.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK);
        let pixels = if cmyk {
            let mut started = jpeg.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)?;
            let raw = started.read_scanlines::<u8>()?;
            started.finish()?;
            let invert = if has_adobe_marker(bytes) { 255 } else { 0 };
            raw.chunks_exact(4)
                .flat_map(|p| {
                    let k = p[3] ^ invert;
                    [p[0] ^ invert, p[1] ^ invert, p[2] ^ invert].map(|c| cmyk_to_rgb(c, k))
                })
                .collect()
        } else {
            let mut started = jpeg.rgb()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            pixels
        };
        Ok(Rgb { width, height, pixels })
    });
    match decoded {
        Ok(Ok(rgb)) => Ok(rgb),
        Ok(Err(err)) => bail!("{err}"),
        Err(payload) => {
            let why = payload.downcast_ref::<String>().map_or("libjpeg failed", String::as_str);
            bail!("{}", why.trim_start_matches("libjpeg fatal error: "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_follows_pillows_rounding() {
        assert_eq!(cmyk_to_rgb(0, 0), 255);
        assert_eq!(cmyk_to_rgb(255, 0), 0);
        assert_eq!(cmyk_to_rgb(0, 255), 0);
        // 127 - round(100 * 127 / 255) = 127 - 50.
        assert_eq!(cmyk_to_rgb(100, 128), 77);
    }
}
