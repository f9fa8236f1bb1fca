//! What one convolution layer is, apart from its weights: channels, kernel, stride, padding and groups,
//! the map sizes they give, and the activation after its BatchNorm.

use tch::Tensor;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: i64,
    pub cout: i64,
    pub k: i64,
    pub stride: i64,
    pub pad: i64,
    /// Channel groups (ResNeXt's cardinality); 1 for a dense convolution.
    pub groups: i64,
}

impl ConvSpec {
    pub fn new(cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> Self {
        ConvSpec { cin, cout, k, stride, pad, groups: 1 }
    }

    /// The same convolution in `groups` channel groups.
    pub fn grouped(self, groups: i64) -> Self {
        ConvSpec { groups, ..self }
    }

    pub fn out_size(&self, size: i64) -> i64 {
        // Floor division, as libtorch's: a kernel larger than the padded map leaves no output.
        (size + 2 * self.pad - self.k).div_euclid(self.stride) + 1
    }

    /// Weights of the convolution: `cout x cin/groups x k x k`.
    pub fn weights(&self) -> i64 {
        self.cout * (self.cin / self.groups) * self.k * self.k
    }
}

/// The activation after a layer's BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The tutorial's and ResNet's.
    Relu,
    /// timm's CSP models': LeakyReLU with slope 0.01.
    LeakyRelu,
    /// None (the last layer of a residual branch, CSPNet's linear expansion).
    Linear,
}

impl Act {
    pub fn apply(self, xs: Tensor) -> Tensor {
        match self {
            Act::Relu => xs.relu(),
            Act::LeakyRelu => xs.leaky_relu(),
            Act::Linear => xs,
        }
    }
}
