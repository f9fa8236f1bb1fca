//! PIL's bilinear resize of 8-bit RGB images, to the bit: `Image.resize((w, h), Image.BILINEAR)` as
//! Pillow's `Resample.c` computes it (what torchvision's `Resize` runs on PIL images). A triangle
//! filter widened by the scale when shrinking (antialiasing), coefficients in 22-bit fixed point,
//! a horizontal and a vertical pass in Pillow's order ([`vertical_first`]), each rounded to 8 bits.

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
pub(crate) const PRECISION_BITS: u32 = 22;

/// For each output pixel of one axis, the first input pixel it reads and its fixed-point weights.
pub(crate) struct Coefficients {
    pub first: Vec<usize>,
    pub weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` (bilinear, support 1) then `normalize_coeffs_8bpc`.
pub(crate) fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let triangle = |x: f64| (1.0 - x.abs()).max(0.0);
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) casts: truncation toward zero, then clamped to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        // Multiplied by the reciprocal, as Pillow does: dividing rounds differently in the last bit,
        // which a fixed-point weight can carry into another 8-bit result.
        let raw: Vec<f64> = (xmin..xmax).map(|x| triangle((x as f64 - center + 0.5) * (1.0 / filter_scale))).collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Whether Pillow runs the vertical pass first: since Pillow 13, when the height shrinks by more
/// than twice as many pixels as the width does (`ImagingResampleInner`); before, never. Results
/// differ in the last bit between the two orders, so csp-tch follows the Pillow it is checked
/// against (scripts/setup.sh installs 13).
pub(crate) fn vertical_first(width: usize, height: usize, out_width: usize, out_height: usize) -> bool {
    let shrink_y = height as i64 - out_height as i64;
    shrink_y > 0 && shrink_y > (width as i64 - out_width as i64) * 2
}

/// One pass along rows of an interleaved RGB image `width` pixels wide: `out_width` wide after.
/// Sums in `i32`, as Pillow's (at most 255 * 2^22 + 2^21).
fn horizontal(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let out_width = c.first.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; pixels.len() / width * out_width];
    for (line, out_line) in pixels.chunks_exact(width * 3).zip(out.chunks_exact_mut(out_width * 3)) {
        for ((&x0, k), px) in c.first.iter().zip(&c.weights).zip(out_line.chunks_exact_mut(3)) {
            let taps = &line[x0 * 3..(x0 + k.len()) * 3];
            let (mut r, mut g, mut b) = (half, half, half);
            for (&w, p) in k.iter().zip(taps.chunks_exact(3)) {
                r += i32::from(p[0]) * w;
                g += i32::from(p[1]) * w;
                b += i32::from(p[2]) * w;
            }
            px.copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
        }
    }
    out
}

/// One pass along columns of an interleaved RGB image `width` pixels wide: each output row sums
/// whole input rows, which vectorises.
fn vertical(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let stride = width * 3;
    let mut out = vec![0u8; c.first.len() * stride];
    let mut sums = vec![0i32; stride];
    for ((&y0, k), out_row) in c.first.iter().zip(&c.weights).zip(out.chunks_exact_mut(stride)) {
        sums.fill(half);
        for (i, &w) in k.iter().enumerate() {
            let row = &pixels[(y0 + i) * stride..][..stride];
            for (s, &p) in sums.iter_mut().zip(row) {
                *s += i32::from(p) * w;
            }
        }
        for (o, &s) in out_row.iter_mut().zip(&sums) {
            *o = clip8(s);
        }
    }
    out
}

/// Resizes an interleaved RGB image of `width` x `height` to `out_width` x `out_height`.
pub fn resize_rgb(pixels: &[u8], width: usize, height: usize, out_width: usize, out_height: usize) -> Vec<u8> {
    assert_eq!(pixels.len(), width * height * 3, "an RGB image of {width}x{height}");
    let across = (width != out_width).then(|| coefficients(width, out_width));
    let down = (height != out_height).then(|| coefficients(height, out_height));
    let pass_across = |p: &[u8]| across.as_ref().map(|c| horizontal(p, width, c));
    if vertical_first(width, height, out_width, out_height) {
        let tall = down.as_ref().map_or_else(|| pixels.to_vec(), |c| vertical(pixels, width, c));
        return pass_across(&tall).unwrap_or(tall);
    }
    let wide = pass_across(pixels).unwrap_or_else(|| pixels.to_vec());
    match &down {
        Some(c) => vertical(&wide, out_width, c),
        None => wide,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_image_stays_constant_at_every_scale() {
        for (w, h, ow, oh) in [(5, 7, 13, 3), (32, 32, 224, 224), (500, 375, 32, 32), (3, 3, 1, 1)] {
            let pixels: Vec<u8> = (0..w * h).flat_map(|_| [17u8, 200, 255]).collect();
            let out = resize_rgb(&pixels, w, h, ow, oh);
            assert_eq!(out.len(), ow * oh * 3);
            assert!(out.chunks(3).all(|p| p == [17, 200, 255]), "{w}x{h} -> {ow}x{oh}");
        }
    }

    #[test]
    fn the_vertical_pass_goes_first_as_in_pillow_13() {
        assert!(vertical_first(30, 40, 24, 24), "height shrinks by 16, more than twice the width's 6");
        assert!(!vertical_first(30, 40, 24, 30), "10 is not more than 12");
        assert!(!vertical_first(32, 32, 224, 224), "enlarging: horizontal first");
        assert!(vertical_first(224, 500, 224, 224), "only the height shrinks");
    }

    #[test]
    fn halving_averages_pixel_pairs() {
        // Shrinking by 2 widens the triangle to two pixels each side; at the edge the first output
        // reads pixels 0..3 with weights 3/4, 3/4, 1/4, normalised to sum to one.
        let row = [0u8, 80, 160, 240];
        let pixels: Vec<u8> = row.iter().flat_map(|&v| [v, v, v]).collect();
        let out = resize_rgb(&pixels, 4, 1, 2, 1);
        let first = ((0.0 * 3.0 + 80.0 * 3.0 + 160.0) / 7.0_f64).round() as u8;
        assert_eq!(out[0], first);
    }
}
