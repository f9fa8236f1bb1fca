//! CIFAR-10 layout checks, loading, subsets, synthetic sets and the download path.

mod common;

use csp_tch::data::cifar10::{FILE_BYTES, RECORD_BYTES};
use csp_tch::data::{self, Access};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect()
}

#[test]
fn synthetic_set_loads_through_tch_with_balanced_labels() {
    let dir = common::synth();
    data::check_layout(dir).unwrap();
    let cifar = data::load(&Default::default(), dir, &Access::default(), 32).unwrap();
    assert_eq!(cifar.train_images.size(), [50_000, 3, 32, 32]);
    assert_eq!(cifar.train_images.kind(), tch::Kind::Uint8);
    assert_eq!(cifar.test_labels.size(), [10_000]);
    let counts = Vec::<i64>::try_from(cifar.train_labels.bincount::<tch::Tensor>(None, 10)).unwrap();
    assert_eq!(counts, vec![5000; 10]);
    assert_eq!(cifar.class_names[3], "pattern3");
    // The uint8 pixels are the bytes in the file: record 0 of data_batch_1.bin.
    let raw = std::fs::read(dir.join("data_batch_1.bin")).unwrap();
    let first = Vec::<u8>::try_from(cifar.train_images.get(0).flatten(0, -1)).unwrap();
    assert_eq!(first, raw[1..RECORD_BYTES]);
    assert_eq!(cifar.train_labels.int64_value(&[0]), raw[0] as i64);
}

#[test]
fn balanced_subset_is_balanced_seeded_and_distinct() {
    let labels: Vec<i64> = (0..1000).map(|i| (i * 7 % 10) as i64).collect();
    let a = data::balanced_subset(&labels, 10, 105, 1).unwrap();
    assert_eq!(a.len(), 105);
    let mut per_class = [0; 10];
    for &i in &a {
        per_class[labels[i as usize] as usize] += 1;
    }
    assert_eq!(per_class, [11, 11, 11, 11, 11, 10, 10, 10, 10, 10]);
    let mut unique = a.clone();
    unique.dedup();
    assert_eq!(unique.len(), a.len(), "indices are sorted and distinct");
    assert_eq!(a, data::balanced_subset(&labels, 10, 105, 1).unwrap());
    assert_ne!(a, data::balanced_subset(&labels, 10, 105, 2).unwrap());
    assert!(data::balanced_subset(&labels, 10, 1001, 1).is_err());
}

#[test]
fn epoch_permutations_are_seeded_permutations() {
    let p = data::epoch_permutation(1000, 3, 1);
    let mut sorted = p.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<i64>>());
    assert_eq!(p, data::epoch_permutation(1000, 3, 1));
    assert_ne!(p, data::epoch_permutation(1000, 3, 2));
    assert_ne!(p, data::epoch_permutation(1000, 4, 1));
}

#[test]
fn missing_truncated_and_corrupt_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_copy(tmp.path());

    // A bad label byte: record 5 of data_batch_3.bin says 10.
    let batch3 = dir.join("data_batch_3.bin");
    let mut f = std::fs::OpenOptions::new().write(true).open(&batch3).unwrap();
    f.seek(SeekFrom::Start(5 * RECORD_BYTES as u64)).unwrap();
    f.write_all(&[10]).unwrap();
    drop(f);
    let err = format!("{:#}", data::load(&Default::default(), &dir, &Access::default(), 32).err().unwrap());
    assert!(err.contains("data_batch_3.bin") && err.contains("record 5") && err.contains("label byte 10"), "{err}");

    // Truncated.
    std::fs::OpenOptions::new().write(true).open(&batch3).unwrap().set_len(FILE_BYTES - 100).unwrap();
    let err = format!("{:#}", data::check_layout(&dir).unwrap_err());
    assert!(err.contains("data_batch_3.bin") && err.contains("30730000") && err.contains("truncated"), "{err}");

    // Missing.
    std::fs::remove_file(dir.join("test_batch.bin")).unwrap();
    std::fs::remove_file(&batch3).unwrap();
    let err = format!("{:#}", data::check_layout(&dir).unwrap_err());
    assert!(err.contains("data_batch_3.bin is missing") && err.contains("csp-tch data download"), "{err}");
    // `data download` wants a folder that does not exist yet: the advice says to remove this one.
    assert!(err.contains(&format!("remove {} and", dir.display())), "{err}");

    let err = format!("{:#}", data::check_layout(&tmp.path().join("nowhere")).unwrap_err());
    assert!(err.contains("does not exist"), "{err}");
}

/// cifar-10-binary.tar.gz's shape: a top folder cifar-10-batches-bin/ holding the files.
fn make_archive(src: &Path, archive: &Path) -> String {
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(archive).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all("cifar-10-batches-bin", src).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    format!("{:x}", md5::compute(std::fs::read(archive).unwrap()))
}

#[test]
fn download_from_a_file_url_verifies_and_extracts_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::synth();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    let md5 = make_archive(src, &archive);
    let url = format!("file://{}", archive.display());
    let parent = tmp.path().join("data");

    // Wrong checksum: refused, nothing left.
    let dest = parent.join("cifar-10-batches-bin");
    let wrong = source(url.clone(), "0".repeat(32));
    let err = format!("{:#}", data::ensure(&Default::default(), &dest, &wrong).unwrap_err());
    assert!(err.contains("MD5") && err.contains(&md5), "{err}");
    assert!(!dest.exists());
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));

    // Unreachable: a clear error saying where to put the files, nothing left.
    let offline = source("http://127.0.0.1:9/cifar-10-binary.tar.gz", md5.clone());
    let err = format!("{:#}", data::ensure(&Default::default(), &dest, &offline).unwrap_err());
    assert!(err.contains("without network") && err.contains("cifar-10-batches-bin"), "{err}");
    assert!(!dest.exists() && leftovers(&parent).is_empty());

    // Not an archive.
    let junk = tmp.path().join("junk.tar.gz");
    std::fs::write(&junk, b"not a tarball").unwrap();
    let junk_md5 = format!("{:x}", md5::compute(b"not a tarball"));
    let bad = source(format!("file://{}", junk.display()), junk_md5);
    let err = format!("{:#}", data::ensure(&Default::default(), &dest, &bad).unwrap_err());
    assert!(err.contains("not a .tar.gz archive") && !err.contains("partial"), "names no deleted temp path: {err}");
    assert!(!dest.exists() && leftovers(&parent).is_empty());

    // An archive without test_batch.bin: incomplete, named by the archive, not by where it was unpacked.
    let part = tmp.path().join("part");
    std::fs::create_dir(&part).unwrap();
    std::fs::copy(src.join("data_batch_1.bin"), part.join("data_batch_1.bin")).unwrap();
    let incomplete = tmp.path().join("incomplete.tar.gz");
    let incomplete_md5 = make_archive(&part, &incomplete);
    let incomplete_source = source(format!("file://{}", incomplete.display()), incomplete_md5);
    let err = format!("{:#}", data::ensure(&Default::default(), &dest, &incomplete_source).unwrap_err());
    assert!(err.contains("is incomplete: data_batch_2.bin is missing") && !err.contains("partial"), "{err}");
    assert!(!dest.exists() && leftovers(&parent).is_empty());

    // The real thing.
    data::ensure(&Default::default(), &dest, &source(url, md5)).unwrap();
    for name in ["data_batch_1.bin", "data_batch_5.bin", "test_batch.bin"] {
        assert_eq!(std::fs::read(dest.join(name)).unwrap(), std::fs::read(src.join(name)).unwrap());
    }
    assert!(leftovers(&parent).is_empty());
}

#[test]
fn data_commands_report_and_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    common::csp_tch_ok(&["data", "synth", "--out", common::s(&dir), "--train", "100", "--test", "50"]);
    let out = common::csp_tch_ok(&["data", "check", "--data-dir", common::s(&dir)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("50000 train (train) / 10000 test (test) images, 10 classes") && text.contains("pattern9"),
        "{text}"
    );

    let out = common::csp_tch(&["data", "check", "--data-dir", common::s(&tmp.path().join("none"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let out = common::csp_tch(&["data", "synth", "--out", common::s(&dir)]);
    assert!(!out.status.success(), "refuses to overwrite");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

/// Where CIFAR-10 comes from, with no image cache.
fn source(url: impl Into<String>, md5: impl Into<String>) -> Access {
    Access { url: Some(url.into()), md5: Some(md5.into()), cache_dir: None }
}
