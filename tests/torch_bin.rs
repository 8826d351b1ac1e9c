//! PyTorch `.bin` archives (written by tests/data/bin/make_bin_fixture.py from the micro safetensors
//! checkpoints) read back bit-identically to their safetensors twins, in both namings, through
//! shared storages, storage offsets, transposed views and bf16 / f16 / f32 storages.

use grok1::checkpoint::torch_bin::read_archive;
use grok1::checkpoint::{self, Tensor, TensorSource, TorchBinSource};
use std::path::{Path, PathBuf};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn all_rows(src: &dyn TensorSource, t: Tensor) -> Vec<f32> {
    let s = src.tensor(t).unwrap();
    let mut v = vec![0f32; s.rows() * s.cols()];
    // Two uneven reads, so a read starts inside the tensor.
    let split = s.rows() / 3;
    let cols = s.cols();
    src.read_rows(t, 0, &mut v[..split * cols]).unwrap();
    src.read_rows(t, split, &mut v[split * cols..]).unwrap();
    v
}

fn compare(bin: &Path, hf: &Path) -> Box<dyn TensorSource> {
    let a = checkpoint::open(bin, None).unwrap();
    let b = checkpoint::open(hf, None).unwrap();
    assert!(a.describe().starts_with("PyTorch .bin"), "{}", a.describe());
    assert_eq!(a.config(), b.config());
    assert_eq!(a.tensors().len(), b.tensors().len());
    for st in a.tensors() {
        assert_eq!(st.shape, b.tensor(st.tensor).unwrap().shape, "{}", st.tensor);
        let (x, y) = (all_rows(&*a, st.tensor), all_rows(&*b, st.tensor));
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert_eq!(
                p.to_bits(),
                q.to_bits(),
                "{} element {i}: .bin {p} vs safetensors {q}",
                st.tensor
            );
        }
    }
    a
}

#[test]
fn keyfan_shards_match_safetensors() {
    let a = compare(&Path::new(DATA).join("bin/keyfan"), &Path::new(DATA).join("micro/hf"));
    assert!(
        a.describe().contains("Keyfan") && a.describe().contains("2 file(s)"),
        "{}",
        a.describe()
    );
    assert!(a.tensors().iter().all(|t| t.dtype == "bf16"));
}

#[test]
fn shards_written_by_torch_itself_match_safetensors() {
    // The keyfan shards loaded and saved again by torch.save (tests/data/bin/make_bin_fixture.py
    // --resave), views and shared storages intact.
    let a = compare(&Path::new(DATA).join("bin/torch-saved"), &Path::new(DATA).join("micro/hf"));
    assert!(a.describe().contains("Keyfan"), "{}", a.describe());
    let f = std::fs::read(Path::new(DATA).join("bin/torch-saved/pytorch_model-00001-of-00002.bin"))
        .unwrap();
    let ts = read_archive(&f).unwrap();
    let q = ts.iter().find(|t| t.name.ends_with("0.multi_head_attention.key.weight")).unwrap();
    assert_eq!(q.tensor.stride, vec![1, 32]);
}

#[test]
fn hpcai_file_matches_safetensors() {
    let a = compare(&Path::new(DATA).join("bin/hpcai"), &Path::new(DATA).join("micro/hf-hpcai"));
    assert!(a.describe().contains("Hpcai"), "{}", a.describe());
    let dtype = |t| a.tensor(t).unwrap().dtype.clone();
    assert_eq!(dtype(Tensor::FfnNorm(1)), "f16");
    assert_eq!(dtype(Tensor::Router(0)), "f32");
    assert_eq!(dtype(Tensor::AttnQ(0)), "bf16");
}

#[test]
fn the_fixtures_exercise_views() {
    // Offsets into shared storages and non-contiguous strides must really be there, or the
    // comparison above proves less than it claims.
    let f =
        std::fs::read(Path::new(DATA).join("bin/keyfan/pytorch_model-00001-of-00002.bin")).unwrap();
    let ts = read_archive(&f).unwrap();
    let get = |n: &str| ts.iter().find(|t| t.name == n).unwrap().tensor.clone();
    let q = get("transformer.decoder_layer.0.multi_head_attention.query.weight");
    assert_eq!((q.shape.clone(), q.stride.clone()), (vec![64, 64], vec![1, 64]));
    let e3 = get("transformer.decoder_layer.0.moe.3.linear_1.weight");
    let e0 = get("transformer.decoder_layer.0.moe.0.linear_1.weight");
    assert_eq!(e3.storage_key, e0.storage_key);
    assert_eq!(e3.offset, 3 * 64 * 128);
    assert_eq!(
        get("lm_head.weight").storage_key,
        get("transformer.in_out_embed.weight").storage_key
    );
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    d
}

fn open_err(dir: &Path) -> String {
    match TorchBinSource::open(dir, None) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn keyfan() -> PathBuf {
    Path::new(DATA).join("bin/keyfan")
}

#[test]
fn checks_the_index_against_the_shards() {
    let d = copy_dir(&keyfan());
    let idx = d.path().join("pytorch_model.bin.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]["transformer.rms_norm.weight"] = "pytorch_model-00001-of-00002.bin".into();
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("transformer.rms_norm.weight") && e.contains("00002-of-00002"), "{e}");

    std::fs::write(&idx, &text).unwrap();
    std::fs::remove_file(d.path().join("pytorch_model-00002-of-00002.bin")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("pytorch_model-00002-of-00002.bin") && e.contains("missing"), "{e}");
}

#[test]
fn refuses_damaged_or_foreign_archives_with_the_reason() {
    let d = copy_dir(&Path::new(DATA).join("bin/hpcai"));
    let f = d.path().join("pytorch_model.bin");
    let bytes = std::fs::read(&f).unwrap();

    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("zip"), "{e}");

    let mut evil = bytes.clone();
    let at = evil.windows(18).position(|w| w == b"_rebuild_tensor_v2").unwrap();
    evil[at + 17] = b'9';
    std::fs::write(&f, &evil).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("`torch._utils._rebuild_tensor_v9` is not allowed"), "{e}");
    assert!(e.contains("archive/data.pkl: pickle byte"), "{e}");

    std::fs::write(&f, b"\x80\x02\x8a\x0alo\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let e = open_err(d.path());
    assert!(e.contains("legacy"), "{e}");
}

#[test]
fn refuses_views_past_their_storage() {
    let d = copy_dir(&Path::new(DATA).join("bin/hpcai"));
    let f = d.path().join("pytorch_model.bin");
    let bytes = std::fs::read(&f).unwrap();
    // The first storage reference: 'cpu' BINPUT, BININT2 numel (16384 = 256 x 64 embedding),
    // TUPLE, BINPUT, BINPERSID, then the storage offset as BININT1 0.
    let at = bytes.windows(3).position(|w| w == b"cpu").unwrap();
    let (numel, offset) = (at + 6, at + 13);
    assert_eq!([bytes[at + 3], bytes[at + 5], bytes[at + 8], bytes[at + 11]], *b"qMtQ");
    assert_eq!(&bytes[numel..numel + 2], &16384u16.to_le_bytes());
    assert_eq!((bytes[offset - 1], bytes[offset]), (b'K', 0));

    let mut small = bytes.clone();
    small[numel..numel + 2].copy_from_slice(&16383u16.to_le_bytes());
    std::fs::write(&f, &small).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.embed_tokens.weight") && e.contains("more elements"), "{e}");

    let mut shifted = bytes.clone();
    shifted[offset] = 1;
    std::fs::write(&f, &shifted).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.embed_tokens.weight") && e.contains("past its storage"), "{e}");
}

#[test]
fn config_override_applies() {
    let cfg = Path::new(DATA).join("micro/hf/config.json");
    let s = checkpoint::open(&keyfan(), Some(&cfg)).unwrap();
    assert_eq!(s.config().n_layers, 2);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["num_hidden_layers"] = 3.into();
    let d = tempfile::tempdir().unwrap();
    let three = d.path().join("c.json");
    std::fs::write(&three, v.to_string()).unwrap();
    let e = checkpoint::open(&keyfan(), Some(&three)).err().unwrap().to_string();
    assert!(e.contains("missing"), "{e}");
}
