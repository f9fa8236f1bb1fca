//! The per-batch transform against hand computation and PIL.

mod common;

use csp_tch::config::Normalize;
use csp_tch::data::transform;
use tch::{Kind, Tensor};

fn image(rows: &[&[f32]]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([1, 1, rows.len() as i64, rows[0].len() as i64])
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let size = t.size();
    let flat = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    flat.chunks(size[3] as usize).map(<[f32]>::to_vec).collect()
}

#[test]
fn resize_matches_a_hand_computed_bilinear_example() {
    // 2 -> 4: output pixel i samples source (i + 0.5) / 2 - 0.5, i.e. -0.25, 0.25, 0.75, 1.25,
    // edges replicated: weights (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1) along each axis.
    // Row 0 is [0, 2.5, 7.5, 10]; halves round up, as PIL does.
    let out = transform::resize(&image(&[&[0.0, 10.0], &[20.0, 30.0]]), 4);
    let expected = vec![
        vec![0.0, 3.0, 8.0, 10.0],
        vec![5.0, 8.0, 13.0, 15.0],
        vec![15.0, 18.0, 23.0, 25.0],
        vec![20.0, 23.0, 28.0, 30.0],
    ];
    assert_eq!(rows(&out), expected);
}

#[test]
fn resize_matches_pil_at_an_odd_scale() {
    // PIL 10's Image.resize((7, 7), Image.BILINEAR) of this 3x3 uint8 image, printed once.
    let src = image(&[&[0.0, 255.0, 7.0], &[100.0, 3.0, 50.0], &[9.0, 200.0, 128.0]]);
    let pil: [[f32; 7]; 7] = [
        [0., 36., 146., 255., 149., 42., 7.],
        [14., 43., 132., 219., 131., 42., 13.],
        [57., 65., 88., 111., 77., 43., 32.],
        [100., 86., 45., 3., 23., 43., 50.],
        [61., 65., 76., 87., 86., 84., 83.],
        [22., 43., 108., 172., 148., 124., 117.],
        [9., 36., 118., 200., 169., 138., 128.],
    ];
    assert_eq!(rows(&transform::resize(&src, 7)), pil.map(|r| r.to_vec()).to_vec());
}

#[test]
fn resize_to_the_same_size_is_the_identity() {
    let src = Tensor::randint(256, [2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    assert!(transform::resize(&src, 32).equal(&src));
}

#[test]
fn normalisations_are_the_tutorials_and_the_unit_one() {
    let px = Tensor::from_slice(&[0.0f32, 1.0, 127.5, 255.0]);
    let tutorial = Vec::<f32>::try_from(transform::normalize(&px, Normalize::Tutorial)).unwrap();
    assert_eq!(tutorial, vec![-1.0, 1.0, 254.0, 509.0]);
    let unit = Vec::<f32>::try_from(transform::normalize(&px, Normalize::Unit)).unwrap();
    let expected = [-1.0, 2.0 / 255.0 - 1.0, 0.0, 1.0];
    for (a, b) in unit.iter().zip(expected) {
        assert!((a - b).abs() < 1e-6, "{unit:?}");
    }
}

#[test]
fn batch_gathers_resizes_and_normalises() {
    let images = Tensor::randint(256, [5, 3, 32, 32], (Kind::Uint8, tch::Device::Cpu));
    let index = Tensor::from_slice(&[4i64, 1]);
    let out = transform::batch(&images, &index, 64, Normalize::Tutorial);
    assert_eq!(out.size(), [2, 3, 64, 64]);
    assert_eq!(out.kind(), Kind::Float);
    let direct = transform::normalize(
        &transform::resize(&images.get(4).unsqueeze(0).to_kind(Kind::Float), 64),
        Normalize::Tutorial,
    );
    assert!(out.get(0).unsqueeze(0).equal(&direct));
}

#[test]
fn the_device_resize_equals_the_host_resize_in_both_pass_orders() {
    // Enlarging, shrinking, one axis only, and shrinks that send Pillow 13 vertical-first.
    tch::manual_seed(3);
    for (w, h, size) in [(13, 9, 40), (32, 32, 224), (40, 30, 24), (30, 40, 24), (30, 40, 37), (24, 60, 24), (7, 7, 5)]
    {
        let images = Tensor::randint(256, [2, 3, h, w], (Kind::Float, tch::Device::Cpu));
        let device = Vec::<f32>::try_from(transform::resize(&images, size).flatten(0, -1)).unwrap();
        for n in 0..2usize {
            let hwc: Vec<u8> = Vec::<f32>::try_from(images.get(n as i64).permute([1, 2, 0]).flatten(0, -1))
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect();
            let host = csp_tch::data::resample::resize_rgb(&hwc, w as usize, h as usize, size as usize, size as usize);
            let plane = (size * size) as usize;
            let ours: Vec<u8> = (0..plane)
                .flat_map(|i| (0..3).map(move |c| (c, i)))
                .map(|(c, i)| device[n * 3 * plane + c * plane + i] as u8)
                .collect();
            assert!(ours == host, "{w}x{h} -> {size}, image {n}");
        }
    }
}

#[test]
fn the_eval_crop_is_torchvisions_resize_then_center_crop() {
    use common::peer::{read_f32, run_python, write_f32};
    let tmp = tempfile::tempdir().unwrap();
    let images = {
        let _rng = common::rng_turn();
        tch::manual_seed(4);
        Tensor::randint(256, [3, 3, 32, 32], (Kind::Float, tch::Device::Cpu))
    };
    write_f32(&tmp.path().join("x"), &images);
    // (size, crop_pct): resized to 27, 31 and 25 px, the last an offset of 2.5 that rounds to 2.
    let cases = [(24i64, 0.875), (28, 0.9), (20, 0.8)];
    let mut script = String::from(
        r#"
import sys, numpy as np
from PIL import Image
import torchvision.transforms as T
d = sys.argv[1]
x = np.fromfile(f"{d}/x", np.float32).astype(np.uint8).reshape(3, 3, 32, 32)
def run(k, size, resized):
    t = T.Compose([T.Resize(resized, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size)])
    out = [np.asarray(t(Image.fromarray(im.transpose(1, 2, 0)))).transpose(2, 0, 1) for im in x]
    np.stack(out).astype(np.float32).tofile(f"{d}/out{k}")
"#,
    );
    for (k, &(size, pct)) in cases.iter().enumerate() {
        script += &format!("run({k}, {size}, {})\n", transform::eval_resize_size(size, pct));
    }
    run_python(&script, tmp.path());
    let index = Tensor::arange(3, (Kind::Int64, tch::Device::Cpu));
    for (k, &(size, pct)) in cases.iter().enumerate() {
        // Normalize::Tutorial is (x - 0.5) / 0.5: undone to compare pixels.
        let ours = transform::center_crop_batch(&images, &index, size, Normalize::Tutorial, pct) * 0.5 + 0.5;
        let theirs = read_f32(&tmp.path().join(format!("out{k}")));
        assert_eq!(Vec::<f32>::try_from(ours.flatten(0, -1)).unwrap(), theirs, "size {size}, crop {pct}");
    }
    assert_eq!(transform::eval_resize_size(224, 0.875), 256, "timm's 224 / 0.875");
}
