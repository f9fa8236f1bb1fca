//! `--dataset folder|cifar100|flowers102`: image folders read as torchvision's `ImageFolder` reads
//! them (checked against torchvision itself), Pillow's conversions and resize, the decode cache,
//! the errors a user's folder can cause, and synthetic CIFAR-100 and Flowers-102 archives fetched from
//! `file://` URLs in their published layouts.

mod common;

use common::{csp_tch, csp_tch_ok, read_json, s};
use csp_tch::data::{decode, folder, images, resample, transform};
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------- writing small images ----------

fn write_png(
    path: &Path,
    (w, h): (u32, u32),
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<Vec<u8>>,
) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut encoder = png::Encoder::new(std::fs::File::create(path).unwrap(), w, h);
    encoder.set_color(color);
    encoder.set_depth(depth);
    if let Some(palette) = palette {
        encoder.set_palette(palette);
    }
    encoder.write_header().unwrap().write_image_data(data).unwrap();
}

fn write_jpeg(path: &Path, (w, h): (usize, usize), space: mozjpeg::ColorSpace, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut c = mozjpeg::Compress::new(space);
    c.set_size(w, h);
    c.set_quality(85.0);
    let mut started = c.start_compress(Vec::new()).unwrap();
    started.write_scanlines(data).unwrap();
    std::fs::write(path, started.finish().unwrap()).unwrap();
}

/// A seeded smooth-ish pattern of `n` bytes.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| ((i * 7 + seed * 31) % 251 ^ (i / 5 * 3)) as u8).collect()
}

/// One image of every kind the folder reader converts, each `(w, h)`, under `dir` (file names
/// start with `tag`).
fn every_kind(dir: &Path, tag: &str, (w, h): (usize, usize), seed: u32) {
    use png::{BitDepth as D, ColorType as C};
    let (wu, hu) = (w as u32, h as u32);
    let n = w * h;
    write_png(&dir.join(format!("{tag}-rgb.png")), (wu, hu), C::Rgb, D::Eight, &pattern(3 * n, seed), None);
    write_png(&dir.join(format!("{tag}-grey.png")), (wu, hu), C::Grayscale, D::Eight, &pattern(n, seed + 1), None);
    write_png(&dir.join(format!("{tag}-rgba.PNG")), (wu, hu), C::Rgba, D::Eight, &pattern(4 * n, seed + 2), None);
    let palette: Vec<u8> = pattern(3 * 16, seed + 3);
    let indices: Vec<u8> = pattern(n, seed + 4).iter().map(|v| v % 16).collect();
    write_png(&dir.join(format!("{tag}-palette.png")), (wu, hu), C::Indexed, D::Eight, &indices, Some(palette));
    // 16-bit: big-endian samples, some above 255 (grey clips, colour keeps its high byte).
    let grey16: Vec<u8> = pattern(n, seed + 5).iter().flat_map(|&v| (u16::from(v) * 3).to_be_bytes()).collect();
    write_png(&dir.join(format!("{tag}-grey16.png")), (wu, hu), C::Grayscale, D::Sixteen, &grey16, None);
    let rgb16: Vec<u8> =
        pattern(3 * n, seed + 6).iter().flat_map(|&v| (u16::from(v) * 257 + 3).to_be_bytes()).collect();
    write_png(&dir.join(format!("{tag}-rgb16.png")), (wu, hu), C::Rgb, D::Sixteen, &rgb16, None);
    write_jpeg(&dir.join(format!("{tag}-rgb.jpg")), (w, h), mozjpeg::ColorSpace::JCS_RGB, &pattern(3 * n, seed + 7));
    write_jpeg(
        &dir.join(format!("{tag}-grey.jpeg")),
        (w, h),
        mozjpeg::ColorSpace::JCS_GRAYSCALE,
        &pattern(n, seed + 8),
    );
    write_jpeg(&dir.join(format!("{tag}-cmyk.jpg")), (w, h), mozjpeg::ColorSpace::JCS_CMYK, &pattern(4 * n, seed + 9));
    image::RgbImage::from_raw(wu, hu, pattern(3 * n, seed + 10)).unwrap().save(dir.join(format!("{tag}.bmp"))).unwrap();
    // Binary PGM (P5); the image crate's encoder writes PAM under that name, which Pillow does not read.
    let pgm = [format!("P5\n{w} {h}\n255\n").into_bytes(), pattern(n, seed + 11)].concat();
    std::fs::write(dir.join(format!("{tag}.pgm")), pgm).unwrap();
    image::RgbImage::from_raw(wu, hu, pattern(3 * n, seed + 12))
        .unwrap()
        .save(dir.join(format!("{tag}.tiff")))
        .unwrap();
    image::RgbImage::from_raw(wu, hu, pattern(3 * n, seed + 13))
        .unwrap()
        .save(dir.join(format!("{tag}.webp")))
        .unwrap();
}

/// How many files [`every_kind`] writes.
const KINDS: i64 = 13;

/// A folder of two splits and three classes, images of mixed kinds and sizes, nested folders,
/// hidden and non-image files that are ignored.
fn image_tree(root: &Path) {
    for (split, seed) in [("train", 0), ("val", 100)] {
        for (c, class) in ["cat", "ant", "bee"].iter().enumerate() {
            let dir = root.join(split).join(class);
            let size = [(9, 7), (40, 30), (16, 16)][c];
            every_kind(&dir, "a", size, seed + c as u32 * 13);
            every_kind(&dir.join("nested/deeper"), "b", (size.1, size.0), seed + 50 + c as u32);
            std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
            std::fs::write(dir.join(".DS_Store"), "hidden").unwrap();
        }
    }
}

// ---------- conventions ----------

#[test]
fn classes_files_and_labels_follow_image_folder_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("split");
    let png = |p: &str| {
        write_png(&root.join(p), (2, 2), png::ColorType::Grayscale, png::BitDepth::Eight, &[1, 2, 3, 4], None)
    };
    for p in [
        "b/z.png",
        "b/a.PNG",
        "b/sub/c.png",
        "b/sub-x/d.png",
        "b/sub/deeper/e.png",
        "b/.hidden.png",
        "a/x.png",
        ".secret/y.png",
        "a/.dir/q.png",
    ] {
        png(p);
    }
    std::fs::write(root.join("a/readme.md"), "text").unwrap();
    std::fs::write(root.join("stray.png"), "a file beside the classes").unwrap();
    let split = folder::scan(&root, None).unwrap();
    assert_eq!(split.classes, ["a", "b"], "sorted; hidden folders and files at the top ignored");
    let files: Vec<(String, i64)> =
        split.files.iter().map(|(p, l)| (p.strip_prefix(&root).unwrap().display().to_string(), *l)).collect();
    // sorted(os.walk(...)) orders folders by their path: "b/sub" < "b/sub-x" < "b/sub/deeper", as '-' < '/'.
    let expected = [
        ("a/x.png", 0),
        ("b/a.PNG", 1),
        ("b/z.png", 1),
        ("b/sub/c.png", 1),
        ("b/sub-x/d.png", 1),
        ("b/sub/deeper/e.png", 1),
    ];
    assert_eq!(files, expected.map(|(p, l)| (p.to_string(), l)));
}

#[test]
fn folder_problems_are_named_with_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let grey = |p: &Path| write_png(p, (2, 2), png::ColorType::Grayscale, png::BitDepth::Eight, &[1, 2, 3, 4], None);
    // An empty class.
    let root = tmp.path().join("empty");
    grey(&root.join("train/a/1.png"));
    std::fs::create_dir_all(root.join("train/b")).unwrap();
    std::fs::write(root.join("train/b/x.txt"), "").unwrap();
    let err = format!("{:#}", folder::scan(&root.join("train"), None).unwrap_err());
    assert!(err.contains("train/b holds no image files") && err.contains(".webp"), "{err}");
    // A class in one split only.
    let root = tmp.path().join("uneven");
    grey(&root.join("train/a/1.png"));
    grey(&root.join("train/b/1.png"));
    grey(&root.join("val/a/1.png"));
    let train = folder::scan(&root.join("train"), None).unwrap();
    let err = format!("{:#}", folder::scan(&root.join("val"), Some(&train.classes)).unwrap_err());
    assert!(err.contains("missing [\"b\"]"), "{err}");
    // A symbolic-link loop.
    let root = tmp.path().join("looped");
    grey(&root.join("a/1.png"));
    std::os::unix::fs::symlink(root.join("a"), root.join("a/again")).unwrap();
    let err = format!("{:#}", folder::scan(&root, None).unwrap_err());
    assert!(err.contains("symbolic-link loop"), "{err}");
    // A linked folder elsewhere is followed.
    let outside = tmp.path().join("outside");
    grey(&outside.join("2.png"));
    std::fs::remove_file(root.join("a/again")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("a/linked")).unwrap();
    assert_eq!(folder::scan(&root, None).unwrap().files.len(), 2);
    // No evaluation split: the run says which it looked for.
    let only_train = tmp.path().join("only-train");
    grey(&only_train.join("train/a/1.png"));
    let cache = tmp.path().join("cache");
    let run =
        csp_tch(&["data", "check", "--dataset", "folder", "--data-dir", s(&only_train), "--cache-dir", s(&cache)]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("no evaluation split val/ or test/") && err.contains("--val-split"),
        "{err}"
    );
    // --val-split test picks the test split when val is absent too.
    grey(&only_train.join("test/a/1.png"));
    csp_tch_ok(&["data", "check", "--dataset", "folder", "--data-dir", s(&only_train), "--cache-dir", s(&cache)]);
    // A missing folder, a file in its place, a missing bench split: each named as what it is.
    let a_file = tmp.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    for (dir, says) in [(tmp.path().join("nowhere"), "image folder"), (a_file.clone(), "is a file, not a folder")] {
        let run = csp_tch(&["train", "--model", "cspdarknet53-pad0", "--dataset", "folder", "--data-dir", s(&dir)]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains(says), "{err}");
    }
    let run = csp_tch(&["data", "bench", "--data-dir", s(&only_train), "--split", "val"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("is not a folder: `data bench` reads"));
    // A folder run needs --data-dir; a flag of another dataset is refused, not ignored.
    let run = csp_tch(&["data", "check", "--dataset", "folder"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("--dataset folder needs --data-dir"));
    for (flag, value) in [("--val-split", "val"), ("--cifar100-labels", "coarse"), ("--flowers-split", "paddle")] {
        let run = csp_tch(&["data", "check", flag, value]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains(&format!("{flag} does not apply to --dataset cifar10")), "{err}");
    }
}

// ---------- pixels ----------

#[test]
fn every_format_converts_to_rgb_as_pillow_does() {
    let tmp = tempfile::tempdir().unwrap();
    every_kind(tmp.path(), "k", (5, 3), 1);
    let read = |name: &str| decode::decode(&std::fs::read(tmp.path().join(name)).unwrap()).unwrap();
    let n = 15;
    let rgb = pattern(3 * n, 1);
    assert_eq!(read("k-rgb.png").pixels, rgb);
    let grey = pattern(n, 2);
    assert_eq!(read("k-grey.png").pixels, grey.iter().flat_map(|&v| [v; 3]).collect::<Vec<_>>());
    let rgba = pattern(4 * n, 3);
    assert_eq!(read("k-rgba.PNG").pixels, rgba.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect::<Vec<_>>());
    let (palette, indices) = (pattern(48, 4), pattern(n, 5));
    let expanded: Vec<u8> = indices.iter().flat_map(|&i| palette[usize::from(i % 16) * 3..][..3].to_vec()).collect();
    assert_eq!(read("k-palette.png").pixels, expanded);
    let clipped: Vec<u8> = pattern(n, 6).iter().flat_map(|&v| [(u16::from(v) * 3).min(255) as u8; 3]).collect();
    assert_eq!(read("k-grey16.png").pixels, clipped, "16-bit grey clips at 255 (Pillow's I;16 to RGB)");
    let high: Vec<u8> = pattern(3 * n, 7).iter().map(|&v| ((u16::from(v) * 257 + 3) >> 8) as u8).collect();
    assert_eq!(read("k-rgb16.png").pixels, high, "16-bit colour keeps its high byte");
    assert_eq!(read("k.bmp").pixels, pattern(3 * n, 11));
    assert_eq!(read("k.pgm").pixels, pattern(n, 12).iter().flat_map(|&v| [v; 3]).collect::<Vec<_>>());
    assert_eq!(read("k.tiff").pixels, pattern(3 * n, 13));
    assert_eq!(read("k.webp").pixels, pattern(3 * n, 14), "lossless WebP");
    // JPEGs are lossy: their exactness is the peer test's; here, the size and a decode of each kind.
    for name in ["k-rgb.jpg", "k-grey.jpeg", "k-cmyk.jpg"] {
        let image = read(name);
        assert_eq!((image.width, image.height, image.pixels.len()), (5, 3, 45), "{name}");
    }
    let bad = decode::decode(b"\xFF\xD8 not really a jpeg").err().unwrap();
    assert!(!format!("{bad:#}").is_empty());
}

/// Runs scripts/imagefolder_peer.py on `root` at `size`: torchvision's classes, samples and pixels.
fn torchvision_reads(root: &Path, size: usize, out: &Path) -> (serde_json::Value, Vec<u8>) {
    let python = std::env::var("CSP_TCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/imagefolder_peer.py");
    let run = Command::new(&python).arg(script).arg(root).arg(size.to_string()).arg(out).output().expect("run python");
    assert!(
        run.status.success(),
        "the torchvision peer failed (scripts/setup.sh installs torchvision):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    (read_json(&out.with_extension("json")), std::fs::read(out.with_extension("u8")).unwrap())
}

#[test]
fn torchvision_reads_the_same_classes_files_labels_and_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    image_tree(&root);
    let size = 24;
    let ours = folder::scan(&root.join("train"), None).unwrap();
    let (theirs, their_pixels) = torchvision_reads(&root.join("train"), size, &tmp.path().join("peer"));
    assert_eq!(theirs["classes"], serde_json::json!(ours.classes));
    let samples: Vec<(String, i64)> = ours.files.iter().map(|(p, l)| (s(p).to_string(), *l)).collect();
    assert_eq!(theirs["samples"], serde_json::json!(samples), "same files in the same order, same labels");
    // Mixed sizes: every image resized here, as Pillow resizes, shrinking and enlarging.
    let settings = images::DecodeSettings { size, skip_bad: false, cache_dir: None };
    let decoded = images::load(&ours.files, &settings, "tree").unwrap();
    assert_eq!((decoded.width, decoded.height), (size, size));
    let pixels = Vec::<u8>::try_from(decoded.images.flatten(0, -1)).unwrap();
    assert_eq!(pixels.len(), their_pixels.len());
    let per_image = 3 * size * size;
    for (i, (a, b)) in pixels.chunks(per_image).zip(their_pixels.chunks(per_image)).enumerate() {
        assert!(a == b, "{}: differs from torchvision's pixels", ours.files[i].0.display());
    }
}

#[test]
fn a_set_of_small_images_enlarged_on_the_device_equals_pillows_resize() {
    // Every image 13x9, smaller than the run's size: kept as decoded, enlarged per batch.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("small");
    for (c, class) in ["x", "y"].iter().enumerate() {
        for k in 0..3 {
            let path = root.join(class).join(format!("{k}.png"));
            let data = pattern(3 * 13 * 9, (c * 3 + k) as u32);
            write_png(&path, (13, 9), png::ColorType::Rgb, png::BitDepth::Eight, &data, None);
        }
        write_jpeg(
            &root.join(class).join("j.jpg"),
            (13, 9),
            mozjpeg::ColorSpace::JCS_RGB,
            &pattern(351, 40 + c as u32),
        );
    }
    let size = 40;
    let ours = folder::scan(&root, None).unwrap();
    let settings = images::DecodeSettings { size, skip_bad: false, cache_dir: None };
    let decoded = images::load(&ours.files, &settings, "small").unwrap();
    assert_eq!((decoded.width, decoded.height), (13, 9), "kept at the decoded size");
    assert_eq!(decoded.images.size(), [8, 3, 9, 13]);
    let stored = decoded.images.to_kind(tch::Kind::Float);
    let pixels = Vec::<u8>::try_from(decoded.images.flatten(0, -1)).unwrap();
    let enlarged =
        Vec::<u8>::try_from(transform::resize(&stored, size as i64).to_kind(tch::Kind::Uint8).flatten(0, -1)).unwrap();
    let (_, theirs) = torchvision_reads(&root, size, &tmp.path().join("peer"));
    assert!(enlarged == theirs, "the device's enlargement differs from torchvision's Resize");
    // And the resize here gives the same.
    let here: Vec<u8> = pixels
        .chunks(3 * 13 * 9)
        .flat_map(|chw| {
            let hwc: Vec<u8> = (0..13 * 9).flat_map(|i| [chw[i], chw[117 + i], chw[234 + i]]).collect();
            let out = resample::resize_rgb(&hwc, 13, 9, size, size);
            (0..3).flat_map(move |c| out.iter().skip(c).step_by(3).copied().collect::<Vec<_>>()).collect::<Vec<_>>()
        })
        .collect();
    assert!(here == theirs, "the host resize differs from torchvision's Resize");
}

// ---------- runs, the cache, bad files ----------

/// `train` of the smallest model on `dataset` in `data` for one epoch at 32 px, in batches of `batch`.
fn dataset_run<'a>(dataset: &'a str, data: &'a Path, out: &'a Path, cache: &'a Path, batch: &'a str) -> Vec<&'a str> {
    let mut args = common::small_run(&["train", "--model", "cspdarknet53-pad0"], data, out, ["1", "all", "all"]);
    args.extend(["--dataset", dataset, "--cache-dir", s(cache), "--batch-size", batch]);
    args
}

/// [`dataset_run`] on an image folder in batches of 8, with `extra` flags.
fn folder_run<'a>(data: &'a Path, out: &'a Path, cache: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = dataset_run("folder", data, out, cache, "8");
    args.extend_from_slice(extra);
    args
}

/// `data download --dataset DATASET --data-dir DIR --data-url URL --data-md5 MD5`.
fn download(dataset: &str, dir: &Path, url: &str, md5: &str) -> std::process::Output {
    csp_tch(&["data", "download", "--dataset", dataset, "--data-dir", s(dir), "--data-url", url, "--data-md5", md5])
}

#[test]
fn a_folder_run_names_its_data_and_reuses_the_cache_until_a_file_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    image_tree(&root);
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    let first = csp_tch_ok(&folder_run(&root, &out, &cache, &[]));
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(log.contains("images decoded in") && !log.contains("from the cache"), "{log}");
    let report = read_json(&out.join("comparison.json"));
    assert_eq!(report["config"]["classes"], 3);
    assert_eq!(report["config"]["dataset"]["name"], "folder");
    let data = &report["data"];
    let per_split = 3 * 2 * KINDS;
    assert_eq!(
        (data["train_images"].as_i64(), data["test_images"].as_i64()),
        (Some(per_split), Some(per_split)),
        "{data}"
    );
    assert_eq!((data["train_split"].as_str(), data["test_split"].as_str()), (Some("train"), Some("val")));
    assert_eq!(data["cache_hit"], false);
    assert_eq!(data["stored_size"], serde_json::json!([32, 32]));
    // The same files again: read from the cache, nothing decoded, the same numbers.
    let out2 = tmp.path().join("out2");
    let second = csp_tch_ok(&folder_run(&root, &out2, &cache, &[]));
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(log.contains("from the cache") && !log.contains("images decoded in"), "{log}");
    assert_eq!(read_json(&out2.join("comparison.json"))["data"]["cache_hit"], true);
    let csv = |o: &Path| common::without_timings(&std::fs::read_to_string(o.join("cspdarknet53-pad0.csv")).unwrap());
    assert_eq!(csv(&out), csv(&out2));
    // Kept in host memory, the cache is trained from as mapped: the same numbers, the file untouched
    // (the mapping is private and read-only).
    let caches: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    let pixels = |c: &[PathBuf]| c.iter().map(|f| std::fs::read(f.join("pixels.u8")).unwrap()).collect::<Vec<_>>();
    let before = pixels(&caches);
    let mapped = tmp.path().join("mapped");
    csp_tch_ok(&folder_run(&root, &mapped, &cache, &["--data-on", "host", "--aug", "crop-flip"]));
    let flipped = tmp.path().join("flipped");
    csp_tch_ok(&folder_run(&root, &flipped, &cache, &["--aug", "crop-flip"]));
    assert_eq!(csv(&mapped), csv(&flipped), "host and device runs from the cache agree");
    assert!(pixels(&caches) == before, "the cache is unchanged");
    // A damaged cache is decoded again (and replaced), not an error.
    let caches: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(caches.len(), 2, "one cache per split");
    for folder in &caches {
        std::fs::OpenOptions::new().write(true).open(folder.join("pixels.u8")).unwrap().set_len(10).unwrap();
    }
    let damaged = csp_tch_ok(&folder_run(&root, &tmp.path().join("damaged"), &cache, &[]));
    let log = String::from_utf8_lossy(&damaged.stderr);
    assert!(log.contains("is damaged (its size is wrong); decoding again"), "{log}");
    assert_eq!(csv(&out), csv(&tmp.path().join("damaged")));
    assert!(csp_tch_ok(&folder_run(&root, &tmp.path().join("again"), &cache, &[]))
        .stderr
        .windows(14)
        .any(|w| w == b"from the cache"));
    // A cache that cannot be written costs a warning, not the run.
    let not_a_folder = tmp.path().join("a-file");
    std::fs::write(&not_a_folder, "").unwrap();
    let unwritable = csp_tch_ok(&folder_run(&root, &tmp.path().join("uncached"), &not_a_folder, &[]));
    assert!(String::from_utf8_lossy(&unwritable.stderr).contains("warning: cannot write the image cache"));
    // One file rewritten: the split is decoded again.
    let changed = root.join("val/ant/a-rgb.png");
    write_png(&changed, (40, 30), png::ColorType::Rgb, png::BitDepth::Eight, &pattern(3600, 99), None);
    let third = csp_tch_ok(&folder_run(&root, &tmp.path().join("out3"), &cache, &[]));
    let log = String::from_utf8_lossy(&third.stderr);
    assert!(log.contains(&format!("val: {per_split} images decoded in")), "{log}");
    assert!(log.contains(&format!("train: {per_split} images from the cache")), "{log}");
}

#[test]
fn a_bad_image_stops_the_run_by_name_or_is_skipped_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            for k in 0..4 {
                let path = root.join(split).join(class).join(format!("{k}.png"));
                write_png(&path, (8, 8), png::ColorType::Rgb, png::BitDepth::Eight, &pattern(192, k), None);
            }
        }
    }
    let corrupt = root.join("train/b/2.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    let run = csp_tch(&folder_run(&root, &out, &cache, &[]));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains(s(&corrupt)) && err.contains("cannot decode it") && err.contains("--skip-bad-images"),
        "{err}"
    );
    assert!(!out.join("comparison.json").exists());
    let run = csp_tch_ok(&folder_run(&root, &out, &cache, &["--skip-bad-images"]));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains(&format!("skipped {}", s(&corrupt))), "{log}");
    let data = read_json(&out.join("comparison.json"))["data"].clone();
    assert_eq!(data["train_images"], 7);
    assert_eq!(data["skipped"][0][0], s(&corrupt));
}

#[test]
fn eval_refuses_data_with_another_number_of_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |root: &Path, classes: &[&str]| {
        for split in ["train", "val"] {
            for class in classes {
                for k in 0..2 {
                    let path = root.join(split).join(class).join(format!("{k}.png"));
                    write_png(&path, (8, 8), png::ColorType::Rgb, png::BitDepth::Eight, &pattern(192, k), None);
                }
            }
        }
    };
    let (three, two) = (tmp.path().join("three"), tmp.path().join("two"));
    make(&three, &["a", "b", "c"]);
    make(&two, &["a", "b"]);
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    csp_tch_ok(&folder_run(&three, &out, &cache, &[]));
    let checkpoint = out.join("checkpoints/cspdarknet53-pad0.safetensors");
    let ok =
        csp_tch_ok(&["eval", "--checkpoint", s(&checkpoint), "--device", "cpu", "--cache-dir", s(&cache), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["test_images"], 6);
    let run = csp_tch(&[
        "eval",
        "--checkpoint",
        s(&checkpoint),
        "--data-dir",
        s(&two),
        "--device",
        "cpu",
        "--cache-dir",
        s(&cache),
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("trained on 3 classes") && err.contains("holds 2"), "{err}");
}

// ---------- CIFAR-100 and Flowers-102 in their published layouts ----------

fn md5_of(path: &Path) -> String {
    format!("{:x}", md5::compute(std::fs::read(path).unwrap()))
}

/// A .tar.gz of `entries` (name, bytes).
fn tar_gz(path: &Path, entries: &[(String, Vec<u8>)]) {
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn cifar100_comes_from_its_archive_with_fine_or_coarse_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let record = |i: usize| {
        let mut r = vec![(i % 20) as u8, (i % 100) as u8];
        r.extend(std::iter::repeat_n((i % 251) as u8, 3072));
        r
    };
    let split = |n: usize| (0..n).flat_map(record).collect::<Vec<u8>>();
    let fine: String = (0..100).map(|c| format!("fine{c}\n")).collect();
    let archive = tmp.path().join("cifar-100-binary.tar.gz");
    tar_gz(
        &archive,
        &[
            ("cifar-100-binary/train.bin".into(), split(50_000)),
            ("cifar-100-binary/test.bin".into(), split(10_000)),
            ("cifar-100-binary/fine_label_names.txt".into(), fine.into_bytes()),
        ],
    );
    let dir = tmp.path().join("cifar100");
    let url = format!("file://{}", archive.display());
    let run = download("cifar100", &dir, &url, &"0".repeat(32));
    assert!(String::from_utf8_lossy(&run.stderr).contains("has MD5"), "a wrong MD5 is refused");
    assert!(!dir.exists());
    let fetched = download("cifar100", &dir, &url, &md5_of(&archive));
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    let check = csp_tch_ok(&["data", "check", "--dataset", "cifar100", "--data-dir", s(&dir)]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("50000 train (train) / 10000 test (test) images, 100 classes"), "{text}");
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["fine7", "500", "100"]), "{text}");
    let check =
        csp_tch_ok(&["data", "check", "--dataset", "cifar100", "--cifar100-labels", "coarse", "--data-dir", s(&dir)]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("20 classes")
            && text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["class3", "2500", "500"]),
        "{text}"
    );
}

/// A MATLAB v5 file holding `arrays` as 1xN doubles (as scipy.io.savemat writes them, uncompressed).
fn write_mat(path: &Path, arrays: &[(&str, Vec<f64>)]) {
    let mut out = Vec::new();
    let mut text = b"MATLAB 5.0 MAT-file, written by csp-tch's tests".to_vec();
    text.resize(116, b' ');
    out.extend(text);
    out.extend([0u8; 8]);
    out.extend(0x0100u16.to_le_bytes());
    out.extend(b"IM");
    let tag = |ty: u32, len: usize| [ty.to_le_bytes(), (len as u32).to_le_bytes()].concat();
    for (name, values) in arrays {
        let mut body = Vec::new();
        body.extend(tag(6, 8));
        body.extend(6u32.to_le_bytes()); // mxDOUBLE_CLASS
        body.extend(0u32.to_le_bytes());
        body.extend(tag(5, 8));
        body.extend(1i32.to_le_bytes());
        body.extend((values.len() as i32).to_le_bytes());
        body.extend(tag(1, name.len()));
        let mut padded = name.as_bytes().to_vec();
        padded.resize(name.len().div_ceil(8) * 8, 0);
        body.extend(padded);
        body.extend(tag(9, values.len() * 8));
        values.iter().for_each(|v| body.extend(v.to_le_bytes()));
        out.extend(tag(14, body.len()));
        out.extend(body);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn flowers102_comes_from_its_three_files_with_paddles_or_torchvisions_split() {
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    // 12 images, labels 1..3 (of 102), of two sizes; trnid 1-3, valid 4-6, tstid 7-12.
    let entries: Vec<(String, Vec<u8>)> = (1..=12)
        .map(|id| {
            let file = tmp.path().join(format!("image_{id:05}.jpg"));
            let (w, h) = if id % 2 == 0 { (50, 40) } else { (30, 45) };
            write_jpeg(&file, (w, h), mozjpeg::ColorSpace::JCS_RGB, &pattern(3 * w * h, id));
            (format!("jpg/image_{id:05}.jpg"), std::fs::read(&file).unwrap())
        })
        .collect();
    tar_gz(&site.join("102flowers.tgz"), &entries);
    let labels: Vec<f64> = (0..12).map(|i| (i % 3 + 1) as f64).collect();
    write_mat(&site.join("imagelabels.mat"), &[("labels", labels)]);
    let ids = |r: std::ops::RangeInclusive<i32>| r.map(f64::from).collect::<Vec<_>>();
    write_mat(&site.join("setid.mat"), &[("trnid", ids(1..=3)), ("valid", ids(4..=6)), ("tstid", ids(7..=12))]);
    let md5s = ["102flowers.tgz", "imagelabels.mat", "setid.mat"].map(|f| md5_of(&site.join(f))).join(",");
    let url = format!("file://{}/", site.display());
    let dir = tmp.path().join("flowers");
    let cache = tmp.path().join("cache");
    let check = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "check",
            "--dataset",
            "flowers102",
            "--data-dir",
            s(&dir),
            "--cache-dir",
            s(&cache),
            "--image-size",
            "32",
        ];
        args.extend_from_slice(extra);
        String::from_utf8_lossy(&csp_tch_ok(&args).stdout).into_owned()
    };
    let fetched = download("flowers102", &dir, &url, &md5s);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert!(dir.join("jpg/image_00012.jpg").exists() && dir.join("setid.mat").exists());
    let paddle = check(&[]);
    assert!(paddle.contains("6 train (train) / 3 test (test) images, 102 classes"), "Paddle trains on tstid: {paddle}");
    // tstid 7..12 have labels 1,2,3,1,2,3 (published) -> classes "1".."3" twice each.
    assert!(paddle.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["2", "2", "1"]), "{paddle}");
    let torchvision = check(&["--flowers-split", "torchvision", "--val-split", "val"]);
    assert!(torchvision.contains("3 train (train) / 3 test (val) images"), "{torchvision}");
    // A run trains on it: 102-way heads, the data named in the report.
    let out = tmp.path().join("out");
    csp_tch_ok(&dataset_run("flowers102", &dir, &out, &cache, "3"));
    let report = read_json(&out.join("comparison.json"));
    assert_eq!(report["config"]["classes"], 102);
    assert_eq!(report["data"]["dataset"], "flowers102");
    let rows = std::fs::read_to_string(out.join("cspdarknet53-pad0.csv")).unwrap();
    assert!(
        rows.lines().next().unwrap().ends_with(",dataset") && rows.lines().nth(1).unwrap().ends_with(",flowers102"),
        "{rows}"
    );
    assert_eq!(report["data"]["cache_hit"], true, "data check filled the cache at this size");
    // The flowers preset reads Flowers-102 without --dataset, with its recipe (shortened here).
    let preset_out = tmp.path().join("preset");
    let mut preset =
        common::small_run(&["train", "--model", "cspdarknet53-pad0"], &dir, &preset_out, ["3", "all", "all"]);
    preset.extend(["--preset", "flowers", "--cache-dir", s(&cache), "--batch-size", "3", "--warmup-epochs", "1"]);
    csp_tch_ok(&preset);
    let report = read_json(&preset_out.join("comparison.json"));
    let config = &report["config"];
    assert_eq!(report["data"]["dataset"], "flowers102", "{config}");
    assert_eq!(
        (config["preset"].as_str(), config["augment"].as_str()),
        (Some("flowers"), Some("rrc-flip")),
        "{config}"
    );
    assert_eq!((config["eval_crop_pct"].as_f64(), config["label_smoothing"].as_f64()), (Some(0.875), Some(0.1)));
    assert_eq!(
        (config["adamw"]["weight_decay"].as_f64(), config["schedule"]["sched"].as_str()),
        (Some(0.05), Some("cosine"))
    );
    // A wrong MD5 among the three is refused, and nothing is left.
    let wrong = tmp.path().join("wrong");
    let bad = format!("{},{}", md5s.rsplit_once(',').unwrap().0, "0".repeat(32));
    let run = download("flowers102", &wrong, &url, &bad);
    assert!(String::from_utf8_lossy(&run.stderr).contains("setid.mat has MD5") && !wrong.exists());
}

#[test]
fn a_set_kept_in_host_memory_trains_and_evaluates_exactly_as_one_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, data_on: &str| {
        let out = tmp.path().join(name);
        let mut args =
            common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), &out, ["2", "200", "100"]);
        // Partial batches on both splits, augmentation and an average: every path a batch takes.
        args.extend(["--batch-size", "48", "--data-on", data_on, "--aug", "crop-flip", "--ema", "0.9"]);
        let log = String::from_utf8_lossy(&csp_tch_ok(&args).stderr).into_owned();
        let csv = common::without_timings(&std::fs::read_to_string(out.join("cspdarknet53-pad0.csv")).unwrap());
        (csv, read_json(&out.join("comparison.json"))["config"].clone(), log)
    };
    let (device, device_config, device_log) = run("device", "device");
    let (host, host_config, host_log) = run("host", "host");
    assert_eq!(host, device, "the same metrics, EMA's included");
    assert!(host_log.contains("kept in host memory (--data-on host)"), "{host_log}");
    assert!(!device_log.contains("host memory"), "{device_log}");
    assert_eq!((host_config["data_on"].as_str(), device_config["data_on"].as_str()), (Some("host"), Some("device")));
}

#[test]
fn cifar10_is_read_as_before() {
    // No dataset section in the config of a CIFAR-10 run: its comparison.json is as it was.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), &out, ["1", "64", "32"]);
    csp_tch_ok(&args);
    let report = read_json(&out.join("comparison.json"));
    assert!(report["config"].get("dataset").is_none(), "{}", report["config"]);
    assert_eq!(report["data"]["dataset"], "cifar10");
    assert_eq!(report["data"]["stored_size"], serde_json::json!([32, 32]));
}
