//! Helpers shared by the integration tests: run the binary, make small synthetic data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn csp_tch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csp-tch")).args(args).output().expect("run csp-tch")
}

/// Runs csp-tch and panics with its stderr unless it succeeds.
pub fn csp_tch_ok(args: &[&str]) -> Output {
    let out = csp_tch(args);
    assert!(out.status.success(), "csp-tch {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A synthetic CIFAR-10 layout (2,000 / 500 distinct images) under `root`.
pub fn synth(root: &Path) -> PathBuf {
    let dir = root.join("synth");
    csp_tch::data::write_synthetic(&dir, 2000, 500, 7).expect("synthetic data");
    dir
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
