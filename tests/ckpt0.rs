//! The release's ckpt-0 pickles read back exactly the weights of their Hugging Face twins (the
//! fixtures were written from the same weights on the int8 grid), and every way a release
//! directory can be wrong is reported by name.

use grok1::checkpoint::{self, Ckpt0Source, SafetensorsSource, Tensor, TensorSource};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MICRO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/micro");
const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/tiny");

fn rows_of(src: &dyn TensorSource, t: Tensor) -> Vec<f32> {
    let s = src.tensor(t).unwrap();
    let mut v = vec![0f32; s.rows() * s.cols()];
    // Uneven batches, so reads start mid-tile.
    let cols = s.cols();
    let mut r = 0;
    let mut batch = 1;
    while r < s.rows() {
        let n = batch.min(s.rows() - r);
        src.read_rows(t, r, &mut v[r * cols..(r + n) * cols]).unwrap();
        r += n;
        batch = batch * 3 + 1;
    }
    v
}

/// Every tensor bit-identical, and the int8 path consistent with it. Returns (tensors, products
/// that bf16 rounding changed, scales not exact in f16) for the report.
fn compare(ckpt0: &Path, hf: &Path) -> (usize, usize, usize) {
    let a = checkpoint::open(ckpt0, None).unwrap();
    let b = checkpoint::open(hf, None).unwrap();
    assert!(a.describe().starts_with("ckpt-0"), "{}", a.describe());
    assert_eq!(a.config(), b.config());
    assert_eq!(a.tensors().len(), b.tensors().len());
    let (mut rounded, mut not_f16) = (0, 0);
    for st in a.tensors() {
        let t = st.tensor;
        assert_eq!(st.shape, b.tensor(t).unwrap().shape, "{t}");
        let x = rows_of(&*a, t);
        let y = rows_of(&*b, t);
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert_eq!(p.to_bits(), q.to_bits(), "{t} element {i}: ckpt-0 {p} vs hf {q}");
        }
        let (rows, cols) = (st.rows(), st.cols());
        let mut q = vec![0i8; rows * cols];
        match a.int8_groups(t) {
            None => {
                let mut s = vec![0f32; rows];
                assert!(!a.read_rows_int8(t, 0, &mut q, &mut s).unwrap(), "{t}");
                assert!(!st.dtype.starts_with("int8"), "{t}");
            }
            Some(g) => {
                assert!(st.dtype.starts_with("int8"), "{t}");
                assert_eq!(cols % g, 0);
                let mut s = vec![0f32; rows * g];
                assert!(a.read_rows_int8(t, 0, &mut q, &mut s).unwrap());
                not_f16 += s.iter().filter(|&&x| half::f16::from_f32(x).to_f32() != x).count();
                for r in 0..rows {
                    for c in 0..cols {
                        let exact = q[r * cols + c] as f32 * s[r * g + c / (cols / g)];
                        let bf = half::bf16::from_f32(exact).to_f32();
                        assert_eq!(bf.to_bits(), y[r * cols + c].to_bits(), "{t} ({r}, {c})");
                        rounded += (bf != exact) as usize;
                        assert!(q[r * cols + c] != -128, "symmetric quantization");
                    }
                }
                // Reading an inner range gives the same values.
                let (r0, n) = (rows / 3, rows / 2);
                let mut q2 = vec![0i8; n * cols];
                let mut s2 = vec![0f32; n * g];
                a.read_rows_int8(t, r0, &mut q2, &mut s2).unwrap();
                assert_eq!(q2, q[r0 * cols..(r0 + n) * cols]);
                assert_eq!(s2, s[r0 * g..(r0 + n) * g]);
            }
        }
    }
    (a.tensors().len(), rounded, not_f16)
}

#[test]
fn micro_ckpt0_matches_its_safetensors_twin() {
    let (n, rounded, not_f16) =
        compare(&Path::new(MICRO).join("ckpt0"), &Path::new(MICRO).join("hf"));
    eprintln!(
        "micro: {n} tensors bit-identical; bf16 rounding changed {rounded} int8*scale products; \
         {not_f16} scales not exact in f16"
    );
    let a = Ckpt0Source::open(&Path::new(MICRO).join("ckpt0"), None).unwrap();
    // 2 of the 7 quantized kinds are row-parallel: G = 2 in this fixture, 1 elsewhere.
    use grok1::checkpoint::Proj;
    assert_eq!(a.int8_groups(Tensor::Expert { layer: 1, expert: 3, proj: Proj::Down }), Some(2));
    assert_eq!(a.int8_groups(Tensor::AttnO(0)), Some(2));
    assert_eq!(a.int8_groups(Tensor::AttnQ(0)), Some(1));
    assert_eq!(a.int8_groups(Tensor::Router(0)), None);
}

#[test]
fn tiny_ckpt0_matches_its_safetensors_twin_and_reads_fast() {
    let dir = Path::new(TINY);
    if !dir.join("ckpt0").is_dir() {
        eprintln!("skipped: {} not present", dir.display());
        return;
    }
    let (n, rounded, not_f16) = compare(&dir.join("ckpt0"), &dir.join("hf"));
    eprintln!(
        "tiny: {n} tensors bit-identical; bf16 rounding changed {rounded} int8*scale products; \
         {not_f16} scales not exact in f16"
    );

    // Reading speed over the same weights, in 64-row batches, best of 3 (files already cached).
    let speed = |src: &dyn TensorSource| {
        let mut best = f64::INFINITY;
        let mut buf = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            for st in src.tensors() {
                let cols = st.cols();
                for r in (0..st.rows()).step_by(64) {
                    let n = 64.min(st.rows() - r);
                    buf.resize(n * cols, 0f32);
                    src.read_rows(st.tensor, r, &mut buf).unwrap();
                }
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let elems: usize = src.tensors().iter().map(|s| s.rows() * s.cols()).sum();
        (src.input_bytes() as f64 / best / 1e6, elems as f64 / best / 1e6)
    };
    let a = Ckpt0Source::open(&dir.join("ckpt0"), None).unwrap();
    let b = SafetensorsSource::open(&dir.join("hf")).unwrap();
    let (amb, ame) = speed(&a);
    let (bmb, bme) = speed(&b);
    eprintln!(
        "read speed: ckpt-0 {amb:.0} MB/s of input ({ame:.0} M weights/s); \
         safetensors {bmb:.0} MB/s ({bme:.0} M weights/s)"
    );
}

fn copy_dir(from: &Path, skip: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(e.path(), d.path().join(&name)).unwrap();
        }
    }
    d
}

fn open_err(dir: &Path, cfg: Option<&Path>) -> String {
    match checkpoint::open(dir, cfg) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn micro_ckpt0() -> PathBuf {
    Path::new(MICRO).join("ckpt0")
}

#[test]
fn names_a_missing_or_extra_file() {
    let d = copy_dir(&micro_ckpt0(), &["tensor00007_000"]);
    let e = open_err(d.path(), None);
    assert!(e.contains("tensor00007_000") && e.contains("missing"), "{e}");

    let d = copy_dir(&micro_ckpt0(), &[]);
    std::fs::copy(d.path().join("tensor00001_000"), d.path().join("tensor00026_000")).unwrap();
    let e = open_err(d.path(), None);
    assert!(e.contains("tensor00026_000") && e.contains("unexpected"), "{e}");

    let d = copy_dir(&micro_ckpt0(), &[]);
    std::fs::copy(d.path().join("tensor00001_000"), d.path().join("tensor00001_001")).unwrap();
    let e = open_err(d.path(), None);
    assert!(e.contains("tensor00001_001"), "{e}");
}

#[test]
fn names_a_file_whose_content_contradicts_its_position() {
    // Files 5 (key, [64, 32]) and 7 (query, [64, 64]) swapped.
    let d = copy_dir(&micro_ckpt0(), &[]);
    let p = d.path();
    std::fs::rename(p.join("tensor00005_000"), p.join("tmp")).unwrap();
    std::fs::rename(p.join("tensor00007_000"), p.join("tensor00005_000")).unwrap();
    std::fs::rename(p.join("tmp"), p.join("tensor00007_000")).unwrap();
    let e = open_err(p, None);
    assert!(e.contains("tensor00005_000"), "{e}");
    assert!(e.contains("[64, 64]") && e.contains("[64, 32]"), "{e}");
    assert!(e.contains("decoder_layer_0/multi_head_attention/key/w"), "{e}");

    // A norm where the router belongs: plain array of the wrong shape.
    let d = copy_dir(&micro_ckpt0(), &[]);
    std::fs::copy(d.path().join("tensor00009_000"), d.path().join("tensor00013_000")).unwrap();
    let e = open_err(d.path(), None);
    assert!(
        e.contains("tensor00013_000") && e.contains("router/w") && e.contains("[64, 8]"),
        "{e}"
    );

    // A float array where a quantized weight belongs.
    let d = copy_dir(&micro_ckpt0(), &[]);
    std::fs::copy(d.path().join("tensor00000_000"), d.path().join("tensor00014_000")).unwrap();
    let e = open_err(d.path(), None);
    assert!(e.contains("tensor00014_000") && e.contains("QuantizedWeight8bit"), "{e}");
}

#[test]
fn names_file_and_offset_of_a_truncated_pickle() {
    let d = copy_dir(&micro_ckpt0(), &[]);
    let f = d.path().join("tensor00002_000");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_err(d.path(), None);
    assert!(e.contains("tensor00002_000") && e.contains("truncated") && e.contains("byte"), "{e}");
    // Cut inside the opcode stream as well as inside a payload.
    for cut in [30, 150, bytes.len() - 1] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let e = open_err(d.path(), None);
        assert!(e.contains("tensor00002_000") && e.contains("pickle byte"), "cut {cut}: {e}");
    }
}

#[test]
fn names_an_unknown_global() {
    let d = copy_dir(&micro_ckpt0(), &[]);
    let f = d.path().join("tensor00003_000");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.windows(8).position(|w| w == b"__main__").unwrap();
    bytes[at..at + 8].copy_from_slice(b"posix\0\0\0");
    bytes[at - 1] = 5; // SHORT_BINUNICODE length
    bytes.drain(at + 5..at + 8);
    std::fs::write(&f, &bytes).unwrap();
    let e = open_err(d.path(), None);
    assert!(
        e.contains("tensor00003_000") && e.contains("`posix.QuantizedWeight8bit` is not allowed"),
        "{e}"
    );
}

#[test]
fn hyper_parameters_come_from_override_then_config_json_then_grok1() {
    // Without config.json: Grok-1's 64 layers, so 744 files are missing.
    let d = copy_dir(&micro_ckpt0(), &["config.json"]);
    let e = open_err(d.path(), None);
    assert!(
        e.contains("tensor00026_000")
            && e.contains("744 of the 770")
            && e.contains("Grok-1 defaults"),
        "{e}"
    );
    // The override rescues it.
    let cfg = Path::new(MICRO).join("hf/config.json");
    let s = checkpoint::open(d.path(), Some(&cfg)).unwrap();
    assert_eq!(s.config().n_layers, 2);
    assert!(s.describe().contains("hf/config.json"), "{}", s.describe());
    // And wins over a config.json beside the pickles.
    let three = d.path().join("three.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["num_hidden_layers"] = 3.into();
    std::fs::write(&three, v.to_string()).unwrap();
    let e = open_err(&micro_ckpt0(), Some(&three));
    assert!(e.contains("3-layer") && e.contains("tensor00026_000"), "{e}");
    // Safetensors checkpoints keep their own config.
    let e = open_err(&Path::new(MICRO).join("hf"), Some(&three));
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn rejects_row_ranges_past_the_end() {
    let s = checkpoint::open(&micro_ckpt0(), None).unwrap();
    let mut v = vec![0f32; 64 * 2];
    assert!(s.read_rows(Tensor::AttnQ(1), 63, &mut v).is_err());
    assert!(s.read_rows(Tensor::AttnQ(1), 62, &mut v).is_ok());
    assert!(s.read_rows(Tensor::AttnQ(1), 0, &mut v[..65]).is_err());
    let mut q = vec![0i8; 64];
    let mut sc = vec![0f32; 3];
    assert!(s.read_rows_int8(Tensor::AttnQ(1), 0, &mut q, &mut sc).is_err());
}
