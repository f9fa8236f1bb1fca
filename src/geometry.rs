//! The geometry of a convolution: channels, kernel, stride, padding, and the map sizes they give.

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: i64,
    pub cout: i64,
    pub k: i64,
    pub stride: i64,
    pub pad: i64,
}

impl ConvSpec {
    pub fn new(cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> Self {
        ConvSpec { cin, cout, k, stride, pad }
    }

    pub fn out_size(&self, size: i64) -> i64 {
        // Floor division, as libtorch's: a kernel larger than the padded map leaves no output.
        (size + 2 * self.pad - self.k).div_euclid(self.stride) + 1
    }
}
