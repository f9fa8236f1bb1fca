//! The PyTorch peer in the project's venv: scripts run on numbers the tests write as raw files.

use super::s;
use std::path::Path;
use std::process::Command;
use tch::Tensor;

pub fn python() -> String {
    std::env::var("CSP_TCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `script` in the venv's Python with `dir` as its argument; panics with its stderr on failure.
pub fn run_python(script: &str, dir: &Path) {
    let out = Command::new(python()).args(["-c", script, s(dir)]).output().expect("run python");
    assert!(out.status.success(), "the PyTorch peer failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// `t` as little-endian float32 values in `path` (numpy's `fromfile(path, float32)`).
pub fn write_f32(path: &Path, t: &Tensor) {
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

pub fn read_f64(path: &Path) -> Vec<f64> {
    std::fs::read(path).unwrap().chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Asserts that `ours` and `theirs` agree to `tolerance` times the largest magnitude of `theirs`.
pub fn assert_close_to(ours: &[f32], theirs: &[f32], tolerance: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= tolerance * scale, "{what}: largest difference {worst} (scale {scale})");
}

/// [`assert_close_to`] at float32 rounding.
pub fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_close_to(ours, theirs, 2e-6, what);
}
