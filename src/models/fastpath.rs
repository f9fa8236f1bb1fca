//! How csp-tch's layers compute, kept apart from what they are ([`crate::models`]): the same outputs
//! and gradients as the plain convolution, with less work.
//!
//! - **Live taps.** A convolution skips kernel taps that can only ever multiply padding: at 32 px
//!   DarkNet53's last stage runs 3x3 convolutions on 1x1 maps, which are exactly their centre tap.
//!   The cut kernel is a view of the weight, so gradients and Adam see the whole weight.
//! - **Folded BatchNorm** for evaluation: `w * gamma / sqrt(var + eps)` and a bias, one biased
//!   convolution per layer while a [`FoldedBatchNorm`] guard lives.
//! - **Dense matrices** for evaluation on the CPU: on a map of a pixel or two a convolution is one
//!   matrix product from the whole input image to the whole output image, which oneDNN's inner
//!   product runs about twice as fast as its convolution kernels ([`crate::models::onednn`]).

use std::cell::RefCell;
use tch::nn;
use tch::Tensor;

use crate::models::geometry::{Act, ConvSpec};
use crate::models::onednn;

impl ConvSpec {
    /// On an `h x w` map, the kernel taps that touch a real pixel at some output position, as an
    /// equivalent smaller convolution; `None` when that is the whole kernel. A 3x3 convolution
    /// padded by 1 on a 1x1 map (DarkNet53's last stage at 32 px) multiplies 8 of its 9 taps by
    /// padding zeros only: it is the 1x1 convolution with its centre tap.
    pub fn live_taps(&self, h: i64, w: i64) -> Option<LiveTaps> {
        let (rows, pad_h) = self.live_range(h);
        let (cols, pad_w) = self.live_range(w);
        (rows.1 < self.k || cols.1 < self.k).then_some(LiveTaps { rows, cols, padding: [pad_h, pad_w] })
    }

    /// Along one axis of `size` pixels: `((first tap, taps), padding)` of the live taps, or the
    /// whole kernel when cutting it would change the outputs.
    fn live_range(&self, size: i64) -> ((i64, i64), i64) {
        let out = self.out_size(size);
        let live = |tap: &i64| (0..out).any(|o| (0..size).contains(&(o * self.stride - self.pad + tap)));
        let whole = ((0, self.k), self.pad);
        let (Some(first), Some(last)) = ((0..self.k).find(live), (0..self.k).rev().find(live)) else {
            return whole;
        };
        let (taps, pad) = (last - first + 1, self.pad - first);
        let same_outputs = pad >= 0 && ConvSpec { k: taps, pad, ..*self }.out_size(size) == out;
        if same_outputs {
            ((first, taps), pad)
        } else {
            whole
        }
    }

    /// Whether, on an `h x w` map, [`ConvSpec::dense_matrix`] needs no more multiply-adds than the
    /// convolution: it multiplies every output pixel by all `h * w` input pixels, the convolution by
    /// its live taps, so this holds on maps of a pixel or two (3x3 padded by 1 on 2x2: 4 against 9).
    pub fn dense_is_no_larger(&self, h: i64, w: i64) -> bool {
        let taps = self.live_taps(h, w).map_or(self.k * self.k, |live| live.rows.1 * live.cols.1);
        h * w <= taps
    }

    /// The convolution on an `h x w` map as one `[cout*oh*ow, cin*h*w]` matrix: row `(o, i, j)`
    /// holds the tap weights output pixel `(i, j)` of channel `o` gives each input value, so that
    /// flattened NCHW images times its transpose are the flattened NCHW outputs.
    pub fn dense_matrix(&self, weight: &Tensor, h: i64, w: i64) -> Tensor {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let matrix = Tensor::zeros([self.cout, oh, ow, self.cin, h, w], (weight.kind(), weight.device()));
        let taps = |i: i64| (0..self.k).map(move |tap| (tap, i * self.stride - self.pad + tap));
        for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
            for (tap_row, p) in taps(i).filter(|(_, p)| (0..h).contains(p)) {
                for (tap_col, q) in taps(j).filter(|(_, q)| (0..w).contains(q)) {
                    let mut pair = matrix.select(5, q).select(4, p).select(2, j).select(1, i);
                    pair.copy_(&weight.select(3, tap_col).select(2, tap_row));
                }
            }
        }
        matrix.view([self.cout * oh * ow, self.cin * h * w])
    }
}

/// The part of a kernel that can reach real pixels, from [`ConvSpec::live_taps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveTaps {
    /// `(first, count)` of the kernel rows and columns kept.
    pub rows: (i64, i64),
    pub cols: (i64, i64),
    /// Padding of the cut convolution, `[rows, columns]`.
    pub padding: [i64; 2],
}

impl LiveTaps {
    /// `weight` (`[cout, cin, k, k]`) restricted to the live taps; a view, so gradients reach it.
    pub fn cut(&self, weight: &Tensor) -> Tensor {
        weight.narrow(2, self.rows.0, self.rows.1).narrow(3, self.cols.0, self.cols.1)
    }
}

/// `xs` convolved (no bias) with `weight` of geometry `spec`, the kernel cut to its live taps.
pub fn conv(xs: &Tensor, weight: &Tensor, spec: ConvSpec) -> Tensor {
    let (weight, padding) = match spec.live_taps(xs.size()[2], xs.size()[3]) {
        Some(live) => (live.cut(weight), live.padding),
        None => (weight.shallow_clone(), [spec.pad; 2]),
    };
    xs.conv2d::<Tensor>(&weight, None, [spec.stride], padding, [1], spec.groups)
}

/// Where a layer keeps its folded form while a [`FoldedBatchNorm`] guard lives.
#[derive(Debug, Default)]
pub struct FoldSlot(RefCell<Option<Folded>>);

impl FoldSlot {
    /// The eval-mode output of the folded layer (convolution, bias, `act`), when folded.
    pub fn forward(&self, spec: ConvSpec, act: Act, xs: &Tensor) -> Option<Tensor> {
        self.0.borrow_mut().as_mut().map(|folded| folded.forward(spec, act, xs))
    }

    /// Folds the eval-mode BatchNorm `bn` (epsilon `eps`) into the convolution `weight`:
    /// `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`.
    fn fold(&self, weight: &Tensor, bn: &nn::BatchNorm, eps: f64) {
        let (gamma, beta) = (bn.ws.as_ref().expect("affine"), bn.bs.as_ref().expect("affine"));
        let folded = tch::no_grad(|| {
            let scale = gamma / (&bn.running_var + eps).sqrt();
            let weight = weight * scale.view([-1, 1, 1, 1]);
            Folded { weight, bias: beta - &bn.running_mean * scale, kernel: None }
        });
        *self.0.borrow_mut() = Some(folded);
    }

    fn unfold(&self) {
        *self.0.borrow_mut() = None;
    }
}

/// Keeps a backbone's BatchNorms folded into its convolutions while it lives.
pub struct FoldedBatchNorm<'a> {
    slots: Vec<&'a FoldSlot>,
}

impl<'a> FoldedBatchNorm<'a> {
    /// Folds each `(slot, convolution weight, BatchNorm after it)` of `layers` into its slot.
    pub fn new(layers: impl IntoIterator<Item = (&'a FoldSlot, &'a Tensor, &'a nn::BatchNorm)>, eps: f64) -> Self {
        let slots = layers
            .into_iter()
            .map(|(slot, weight, bn)| {
                slot.fold(weight, bn, eps);
                slot
            })
            .collect();
        FoldedBatchNorm { slots }
    }
}

impl Drop for FoldedBatchNorm<'_> {
    fn drop(&mut self) {
        for slot in &self.slots {
            slot.unfold();
        }
    }
}

/// A convolution with its BatchNorm folded in.
#[derive(Debug)]
struct Folded {
    weight: Tensor,
    bias: Tensor,
    /// How the last input size is computed, kept so that evaluating batch after batch does not
    /// rebuild it every time.
    kernel: Option<(KernelKey, FoldedKernel)>,
}

/// What a [`FoldedKernel`] was built for: the input's `h x w`, and whether the dense path may take it
/// (oneDNN's inner product applies, [`onednn::linear_relu_applies`], to an ungrouped ReLU layer).
type KernelKey = (i64, i64, bool);

/// How a folded layer computes one input size.
#[derive(Debug)]
enum FoldedKernel {
    /// The convolution, its weight cut to the live taps ([`ConvSpec::live_taps`]).
    Conv { weight: Tensor, padding: [i64; 2] },
    /// On the CPU, where [`ConvSpec::dense_is_no_larger`]: the whole convolution as one matrix
    /// ([`ConvSpec::dense_matrix`]) through oneDNN's inner product, about twice as fast as its
    /// convolution kernels on maps of a pixel or two (few output pixels leave them little to block).
    Dense { matrix: Tensor, bias: Tensor, out: [i64; 3] },
}

impl Folded {
    fn forward(&mut self, spec: ConvSpec, act: Act, xs: &Tensor) -> Tensor {
        let [n, _, h, w] = xs.size()[..] else { panic!("a convolution expects NCHW input, got {:?}", xs.size()) };
        // oneDNN's inner product fuses a ReLU; the dense matrix is built for ungrouped convolutions.
        let dense = act == Act::Relu && spec.groups == 1 && onednn::linear_relu_applies(xs);
        let key = (h, w, dense);
        if self.kernel.as_ref().is_none_or(|(built_for, _)| *built_for != key) {
            self.kernel = Some((key, self.kernel_for(spec, key)));
        }
        match &self.kernel.as_ref().expect("just built").1 {
            FoldedKernel::Conv { weight, padding } => {
                act.apply(xs.conv2d(weight, Some(&self.bias), [spec.stride], padding, [1], spec.groups))
            }
            FoldedKernel::Dense { matrix, bias, out } => {
                onednn::linear_relu(&xs.flatten(1, -1), matrix, bias).view([n, out[0], out[1], out[2]])
            }
        }
    }

    fn kernel_for(&self, spec: ConvSpec, (h, w, dense): KernelKey) -> FoldedKernel {
        if dense && spec.dense_is_no_larger(h, w) {
            let out = [spec.cout, spec.out_size(h), spec.out_size(w)];
            return FoldedKernel::Dense {
                matrix: spec.dense_matrix(&self.weight, h, w),
                bias: self.bias.repeat_interleave_self_int(out[1] * out[2], 0, None),
                out,
            };
        }
        match spec.live_taps(h, w) {
            // A dense copy in the weight's own layout (NCHW or channels-last).
            Some(live) => FoldedKernel::Conv { weight: live.cut(&self.weight).copy(), padding: live.padding },
            None => FoldedKernel::Conv { weight: self.weight.shallow_clone(), padding: [spec.pad; 2] },
        }
    }
}
