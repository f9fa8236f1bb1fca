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

/// Rows the horizontal pass takes at once: their pixels side by side (`ROWS` x RGB), so that each
/// tap is one multiply-add over `LANES` contiguous values, which vectorises.
const ROWS: usize = 8;
const LANES: usize = ROWS * 3;

/// One pass along rows of an interleaved RGB image `width` pixels wide: `out_width` wide after.
/// Sums in `i32`, as Pillow's (at most 255 * 2^22 + 2^21). `ROWS` rows at a time are first laid
/// out column by column (`block[x][row][channel]`).
#[inline(always)]
fn horizontal_rows(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let out_width = c.first.len();
    let height = pixels.len() / (width * 3);
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; height * out_width * 3];
    let mut block = vec![0u8; width * LANES];
    for top in (0..height).step_by(ROWS) {
        let rows = ROWS.min(height - top);
        for r in 0..rows {
            let line = &pixels[(top + r) * width * 3..][..width * 3];
            for (x, px) in line.chunks_exact(3).enumerate() {
                block[x * LANES + r * 3..][..3].copy_from_slice(px);
            }
        }
        // Lanes of rows past the image's last hold an earlier block's pixels: summed, never stored.
        for (x, (&x0, k)) in c.first.iter().zip(&c.weights).enumerate() {
            let mut sums = [half; LANES];
            for (i, &w) in k.iter().enumerate() {
                let taps: &[u8; LANES] = block[(x0 + i) * LANES..][..LANES].try_into().expect("LANES bytes");
                for (s, &p) in sums.iter_mut().zip(taps) {
                    *s += i32::from(p) * w;
                }
            }
            let rounded: [u8; LANES] = std::array::from_fn(|l| clip8(sums[l]));
            for r in 0..rows {
                out[((top + r) * out_width + x) * 3..][..3].copy_from_slice(&rounded[r * 3..r * 3 + 3]);
            }
        }
    }
    out
}

/// Values of an output row the vertical pass sums at once, in registers.
const CHUNK: usize = 32;

/// One pass along columns of an interleaved RGB image `width` pixels wide: each output row sums
/// whole input rows, `CHUNK` values at a time.
#[inline(always)]
fn vertical_rows(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let stride = width * 3;
    let mut out = vec![0u8; c.first.len() * stride];
    for ((&y0, k), out_row) in c.first.iter().zip(&c.weights).zip(out.chunks_exact_mut(stride)) {
        let rows = &pixels[y0 * stride..(y0 + k.len()) * stride];
        let whole = stride - stride % CHUNK;
        for at in (0..whole).step_by(CHUNK) {
            let mut sums = [half; CHUNK];
            for (i, &w) in k.iter().enumerate() {
                let taps: &[u8; CHUNK] = rows[i * stride + at..][..CHUNK].try_into().expect("CHUNK bytes");
                for (s, &p) in sums.iter_mut().zip(taps) {
                    *s += i32::from(p) * w;
                }
            }
            for (o, &s) in out_row[at..at + CHUNK].iter_mut().zip(&sums) {
                *o = clip8(s);
            }
        }
        for at in whole..stride {
            let s = k.iter().enumerate().fold(half, |s, (i, &w)| s + i32::from(rows[i * stride + at]) * w);
            out_row[at] = clip8(s);
        }
    }
    out
}

/// Each pass compiled twice, for the baseline CPU and for AVX2 (chosen when this CPU has it): the
/// same integer sums, so the same pixels, in vectors twice as wide.
macro_rules! with_avx2 {
    ($name:ident, $avx2:ident, $body:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
            $body(pixels, width, c)
        }

        fn $name(pixels: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: this CPU has AVX2.
                return unsafe { $avx2(pixels, width, c) };
            }
            $body(pixels, width, c)
        }
    };
}
with_avx2!(horizontal, horizontal_avx2, horizontal_rows);
with_avx2!(vertical, vertical_avx2, vertical_rows);

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

    /// Pillow's sum for one output value, written out: `along_rows` sums neighbours in a row.
    fn one_pass_by_pixel(pixels: &[u8], width: usize, c: &Coefficients, along_rows: bool) -> Vec<u8> {
        let height = pixels.len() / (width * 3);
        let (out_w, out_h) = if along_rows { (c.first.len(), height) } else { (width, c.first.len()) };
        let mut out = Vec::with_capacity(out_w * out_h * 3);
        for y in 0..out_h {
            for x in 0..out_w {
                for ch in 0..3 {
                    let (first, k) = if along_rows { (c.first[x], &c.weights[x]) } else { (c.first[y], &c.weights[y]) };
                    let mut sum = 1i32 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        let (sx, sy) = if along_rows { (first + i, y) } else { (x, first + i) };
                        sum += i32::from(pixels[(sy * width + sx) * 3 + ch]) * w;
                    }
                    out.push(clip8(sum));
                }
            }
        }
        out
    }

    #[test]
    fn both_passes_on_both_code_paths_sum_as_pillow_does() {
        // Heights that leave a partial block of rows, widths that leave a partial chunk of values,
        // shrinking and enlarging.
        let mut state = 7u32;
        for (w, h, to) in [(500, 375, 224), (13, 9, 40), (37, 51, 20), (7, 300, 5), (33, 1, 64), (224, 17, 224)] {
            let pixels: Vec<u8> = (0..w * h * 3)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 24) as u8
                })
                .collect();
            let (across, down) = (coefficients(w, to), coefficients(h, to));
            let wide = one_pass_by_pixel(&pixels, w, &across, true);
            let tall = one_pass_by_pixel(&pixels, w, &down, false);
            assert_eq!(horizontal(&pixels, w, &across), wide, "{w}x{h} across");
            assert_eq!(horizontal_rows(&pixels, w, &across), wide, "{w}x{h} across, baseline");
            assert_eq!(vertical(&pixels, w, &down), tall, "{w}x{h} down");
            assert_eq!(vertical_rows(&pixels, w, &down), tall, "{w}x{h} down, baseline");
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
