//! The registry: every model csp-tch knows by name, with what it is and how its architecture is made.

use anyhow::{bail, Result};

use super::architecture::Architecture;
use super::{timm, tutorial};

/// BatchNorm's epsilon (PaddleClas, PyTorch and timm).
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm's running-statistics momentum, in PyTorch's sense (Paddle's 0.9).
pub const BN_MOMENTUM: f64 = 0.1;

/// The most classes a head may have: far beyond any dataset (ImageNet-21k has 21,843), and small
/// enough that no parameter or MAC count can overflow.
pub const MAX_CLASSES: i64 = 1_000_000;

/// The largest square input size csp-tch accepts, in pixels.
pub const MAX_IMAGE_SIZE: i64 = 4096;

/// One entry of the model registry.
pub struct ModelInfo {
    pub name: &'static str,
    pub about: &'static str,
    /// For a CSP model, the plain network it is compared with.
    pub base: Option<&'static str>,
    /// Whether `run-all` trains it when `--models` is not given (the tutorial's three).
    pub default: bool,
    architecture: fn(&'static ModelInfo, i64) -> Architecture,
}

impl std::fmt::Debug for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every backbone csp-tch knows. Adding one is one entry here.
pub const MODELS: [ModelInfo; 8] = [
    ModelInfo {
        name: "darknet53",
        about: "DarkNet53 as in PaddleClas (the tutorial's baseline)",
        base: None,
        default: true,
        architecture: tutorial::darknet53,
    },
    ModelInfo {
        name: "cspdarknet53",
        about: "CSPDarkNet53 as the tutorial wrote it (1x1 convolutions padded by 1)",
        base: Some("darknet53"),
        default: true,
        architecture: tutorial::cspdarknet53,
    },
    ModelInfo {
        name: "cspdarknet53-pad0",
        about: "CSPDarkNet53 with unpadded 1x1 convolutions (what the CSP split itself saves)",
        base: Some("darknet53"),
        default: true,
        architecture: tutorial::cspdarknet53_pad0,
    },
    ModelInfo {
        name: "cspdarknet53-paper",
        about: "CSPDarkNet53 of the CSPNet paper, as timm defines it (LeakyReLU, cross stages)",
        base: Some("darknet53"),
        default: false,
        architecture: timm::cspdarknet53,
    },
    ModelInfo {
        name: "resnet50",
        about: "ResNet-50 as timm defines it",
        base: None,
        default: false,
        architecture: timm::resnet50,
    },
    ModelInfo {
        name: "cspresnet50",
        about: "CSPResNet-50 of the CSPNet paper, as timm defines it",
        base: Some("resnet50"),
        default: false,
        architecture: timm::cspresnet50,
    },
    ModelInfo {
        name: "resnext50",
        about: "ResNeXt-50 32x4d as timm defines it",
        base: None,
        default: false,
        architecture: timm::resnext50,
    },
    ModelInfo {
        name: "cspresnext50",
        about: "CSPResNeXt-50 of the CSPNet paper, as timm defines it",
        base: Some("resnext50"),
        default: false,
        architecture: timm::cspresnext50,
    },
];

impl ModelInfo {
    /// Smallest square input on which every strided layer still sees real pixels, i.e. a 1x1
    /// final map: the product of the strides (32 for every model here).
    pub fn min_image_size(&'static self) -> i64 {
        self.architecture(1).total_stride()
    }

    /// An error naming `--image-size` when the input is too small for this model.
    pub fn check_image_size(&'static self, image_size: i64) -> Result<()> {
        let min = self.min_image_size();
        if image_size < min {
            bail!(
                "--image-size {image_size} is too small for {}: its strided layers need at least {min} px \
                 (a 1x1 final feature map)",
                self.name
            );
        }
        Ok(())
    }

    /// Its architecture with a `classes`-way head.
    pub fn architecture(&'static self, classes: i64) -> Architecture {
        (self.architecture)(self, classes)
    }
}

/// Names of all registered models, in registry order.
pub fn model_names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// The models `run-all` trains by default: the tutorial's three.
pub fn default_models() -> Vec<&'static str> {
    MODELS.iter().filter(|m| m.default).map(|m| m.name).collect()
}

/// Looks a model up by name; an unknown name is an error listing the valid ones.
pub fn model_info(name: &str) -> Result<&'static ModelInfo> {
    match MODELS.iter().find(|m| m.name == name) {
        Some(info) => Ok(info),
        None => bail!("unknown model '{name}'; valid models: {}", model_names().join(", ")),
    }
}

/// The model a CSP model is compared with, or `None` for a plain one.
pub fn base_of(name: &str) -> Option<&'static str> {
    model_info(name).ok().and_then(|m| m.base)
}
