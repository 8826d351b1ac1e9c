//! The GPU kernels' logic without a GPU: the CUDA sources (src/gpu/cu/) compiled as host C++
//! against a small emulation of the CUDA execution model (tests/gpu_emu/emu.h: a thread per CUDA
//! thread, real barriers and warp shuffles) and launched with the library's own launch geometry,
//! against the same CPU references as the GPU tests. Skips when no C++20 compiler is found.

use grok1::config::GrokConfig;
use grok1::gpu::launch::{self, Geometry};
use grok1::gpu::layout::repack;
use grok1::gpu::source;
use grok1::model::attention::{attend, AttnParams, AttnScratch};
use grok1::model::ops;
use grok1::quant::QuantType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Build the emulator once per test run (reused while the sources are unchanged).
fn emulator() -> Option<&'static Path> {
    static EMU: OnceLock<Option<PathBuf>> = OnceLock::new();
    EMU.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu-emu");
        std::fs::create_dir_all(&dir).unwrap();
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu_emu");
        let mut src = format!("#include \"{}\"\n", here.join("emu.h").display());
        src.push_str(&source::program());
        src.push_str(&format!("#include \"{}\"\n", here.join("main.cpp").display()));
        src.push_str("std::map<std::string, std::function<void(const std::vector<Arg>&)>> emu_registry() {\n    return {\n");
        for k in source::kernel_names() {
            src.push_str(&format!("        {{\"{k}\", emu_kernel({k})}},\n"));
        }
        src.push_str("    };\n}\n");
        let deps = [std::fs::read_to_string(here.join("emu.h")).unwrap(), std::fs::read_to_string(here.join("main.cpp")).unwrap()];
        let stamp = format!("{:x}", { use std::hash::{Hash, Hasher}; let mut h = std::collections::hash_map::DefaultHasher::new(); (&src, &deps).hash(&mut h); h.finish() });
        let exe = dir.join(format!("emu-{stamp}"));
        if exe.exists() {
            return Some(exe);
        }
        let cpp = dir.join("kernels.cpp");
        std::fs::write(&cpp, &src).unwrap();
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = match Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-o"])
            .arg(&exe)
            .arg(&cpp)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping the kernel emulation: no C++ compiler `{cxx}` ({e})");
                return None;
            }
        };
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            if log.contains("barrier") && log.contains("No such file") {
                eprintln!("skipping the kernel emulation: `{cxx}` has no C++20 <barrier>");
                return None;
            }
            panic!("the kernels do not compile as host C++:\n{log}");
        }
        Some(exe)
    })
    .as_deref()
}

macro_rules! emu_or_skip {
    () => {
        match emulator() {
            Some(e) => e,
            None => return,
        }
    };
}

/// One kernel argument.
enum A<'a> {
    F32s(&'a mut Vec<f32>),
    Bytes(&'a mut Vec<u8>),
    U16s(&'a [u16]),
    I32s(&'a [i32]),
    I(i64),
    F(f64),
    Null,
}

fn to_bytes<T: Copy>(v: &[T], f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Run `kernel` with geometry `g`; float and byte buffers come back with the kernel's writes.
fn launch(emu: &Path, kernel: &str, g: Geometry, args: &mut [A]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(emu);
    cmd.arg(kernel)
        .arg(g.grid.0.to_string())
        .arg(g.grid.1.to_string())
        .arg(g.block.to_string())
        .arg(g.shared_bytes.to_string());
    for (i, a) in args.iter().enumerate() {
        let path = dir.path().join(format!("a{i}"));
        let bytes = match a {
            A::F32s(v) => Some(to_bytes(v, |x: f32| x.to_le_bytes().to_vec())),
            A::Bytes(v) => Some(v.to_vec()),
            A::U16s(v) => Some(to_bytes(v, |x: u16| x.to_le_bytes().to_vec())),
            A::I32s(v) => Some(to_bytes(v, |x: i32| x.to_le_bytes().to_vec())),
            _ => None,
        };
        match (a, bytes) {
            (_, Some(b)) => {
                std::fs::write(&path, b).unwrap();
                cmd.arg(format!("buf:{}", path.display()));
            }
            (A::I(v), None) => {
                cmd.arg(format!("i:{v}"));
            }
            (A::F(v), None) => {
                cmd.arg(format!("f:{v:e}"));
            }
            _ => {
                cmd.arg("null");
            }
        }
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{kernel}: {}", String::from_utf8_lossy(&out.stderr));
    for (i, a) in args.iter_mut().enumerate() {
        let path = dir.path().join(format!("a{i}"));
        match a {
            A::F32s(v) => {
                let b = std::fs::read(&path).unwrap();
                for (x, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            A::Bytes(v) => **v = std::fs::read(&path).unwrap(),
            _ => {}
        }
    }
}

/// Deterministic values in [-scale, scale) with one in 61 eight times larger.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = ((x >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0;
            if i % 61 == 7 {
                8.0 * scale * u
            } else {
                scale * u
            }
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    a.iter().zip(b).enumerate().map(|(i, (x, y))| ((x - y).abs(), i)).fold((0.0, 0), |m, v| {
        if v.0 > m.0 || v.0.is_nan() {
            v
        } else {
            m
        }
    })
}

#[test]
fn matrix_kernels_match_the_cpu() {
    let emu = emu_or_skip!();
    for q in QuantType::ALL {
        if grok1::gpu::layout::unsupported(q).is_some() {
            continue; // no device kernel: such matrices stay on the CPU
        }
        let shapes: &[(usize, usize)] = match q {
            QuantType::F32 | QuantType::Bf16 => &[(3, 7), (37, 33), (5, 64)],
            QuantType::Q4K | QuantType::Q4S => &[(3, 768), (9, 512)],
            _ => &[(5, 96), (37, 288), (2, 1024)],
        };
        for &(rows, cols) in shapes {
            let rb = q.row_bytes(cols).unwrap();
            let w = random(rows * cols, (rows * 7919 + cols) as u64, 1.0);
            let mut bytes = vec![0u8; rows * rb];
            for (r, o) in w.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
                q.quantize_row(r, o);
            }
            let mut deq = vec![0f32; rows * cols];
            for (b, o) in bytes.chunks_exact(rb).zip(deq.chunks_exact_mut(cols)) {
                q.dequantize_row(b, o);
            }
            let l = repack(q, rows, cols, &bytes).unwrap();
            for (n, tiled) in [(1, false), (3, false), (1, true), (5, true), (67, true)] {
                let mut xs = random(n * cols, (n * 31 + cols) as u64, 1.0);
                let mut ys = vec![f32::NAN; n * rows];
                let mut wbuf = l.w.clone();
                let mut args = vec![
                    A::Bytes(&mut wbuf),
                    if l.d.is_empty() { A::Null } else { A::U16s(&l.d) },
                    A::F32s(&mut xs),
                    A::F32s(&mut ys),
                    A::I(rows as i64),
                    A::I(cols as i64),
                ];
                let (name, g) = if tiled {
                    args.push(A::I(n as i64));
                    (source::matmul_kernel(q), launch::matmul(rows, n))
                } else {
                    (source::matvec_kernel(q), launch::matvec(rows, n))
                };
                launch(emu, name, g, &mut args);
                drop(args);
                for t in 0..n {
                    let x = &xs[t * cols..][..cols];
                    for r in 0..rows {
                        let wr = &deq[r * cols..][..cols];
                        let want: f64 = wr.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = wr.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let got = ys[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-6,
                            "{name} [{rows}, {cols}] n={n}: token {t} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn norm_rope_softmax_and_activations_match_the_cpu() {
    let emu = emu_or_skip!();
    for d in [1usize, 7, 300] {
        let n = 3;
        let mut x = random(n * d, d as u64, 2.0);
        let mut scale = random(d, d as u64 + 1, 1.5);
        let acc0 = random(n * d, d as u64 + 2, 1.0);
        let (mut want, mut want_acc, mut tmp) = (vec![0f32; n * d], acc0.clone(), vec![0f32; d]);
        ops::rms_norm_rows(&x, &scale, 1e-5, &mut want);
        ops::add_rms_norm_rows(&mut want_acc, &x, &scale, 1e-5, &mut tmp);
        for (accumulate, start, expect) in [(0, vec![0f32; n * d], &want), (1, acc0.clone(), &want_acc)] {
            let mut out = start;
            launch(
                emu,
                "rms_norm_rows",
                launch::rows(n),
                &mut [
                    A::F32s(&mut x),
                    A::F32s(&mut scale),
                    A::F32s(&mut out),
                    A::I(d as i64),
                    A::F(1e-5),
                    A::I(accumulate),
                ],
            );
            let (e, i) = max_diff(&out, expect);
            assert!(
                e <= 2e-6 * expect[i].abs().max(1.0),
                "rms_norm d={d} acc={accumulate}: {} vs {}",
                out[i],
                expect[i]
            );
        }
    }
    for (hd, heads, pos0) in [(6usize, 3usize, 0usize), (128, 2, 8190)] {
        let t = 3;
        let mut x = random(t * heads * hd, hd as u64, 3.0);
        let mut want = x.clone();
        let (mut c, mut s) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        for tt in 0..t {
            ops::rope_phases(pos0 + tt, hd, 1e4, &mut c, &mut s);
            ops::rope_in_place(&mut want[tt * heads * hd..][..heads * hd], hd, &c, &s);
        }
        let g = launch::elementwise(t * heads * hd / 2);
        launch(
            emu,
            "rope_rows",
            g,
            &mut [
                A::F32s(&mut x),
                A::I(t as i64),
                A::I(heads as i64),
                A::I(hd as i64),
                A::I(pos0 as i64),
                A::F(1e4),
            ],
        );
        let (e, i) = max_diff(&x, &want);
        assert!(e <= 4e-6, "rope hd={hd} pos0={pos0}: {} vs {}", x[i], want[i]);
    }
    for len in [1usize, 5, 700] {
        let n = 2;
        let mut x = random(n * len, len as u64, 20.0);
        for (i, v) in x.iter_mut().enumerate() {
            if i % 7 == 3 {
                *v = -1e30;
            }
        }
        let mut want = x.clone();
        want.chunks_exact_mut(len).for_each(ops::softmax);
        launch(emu, "softmax_rows", launch::rows(n), &mut [A::F32s(&mut x), A::I(len as i64)]);
        let (e, i) = max_diff(&x, &want);
        assert!(e <= 1e-6, "softmax len={len}: {} vs {}", x[i], want[i]);
    }
    let n = 1001;
    let (mut g, mut u) = (random(n, 5, 6.0), random(n, 6, 2.0));
    let want: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| ops::gelu_tanh(a) * b).collect();
    let want_gelu: Vec<f32> = g.iter().map(|&a| ops::gelu_tanh(a)).collect();
    let mut g2 = g.clone();
    launch(emu, "gelu_tanh", launch::elementwise(n), &mut [A::F32s(&mut g2), A::I(n as i64)]);
    launch(emu, "geglu", launch::elementwise(n), &mut [A::F32s(&mut g), A::F32s(&mut u), A::I(n as i64)]);
    for (got, want, what) in [(&g2, &want_gelu, "gelu"), (&g, &want, "geglu")] {
        let (e, i) = max_diff(got, want);
        assert!(e <= 2e-6 * want[i].abs().max(1.0), "{what}: {} vs {}", got[i], want[i]);
    }
}

#[test]
fn gather_and_scatter_route_rows() {
    let emu = emu_or_skip!();
    let (n_tok, d) = (9usize, 37usize);
    let mut src = random(n_tok * d, 8, 1.0);
    let idx = [7i32, 0, 4, 8];
    let gates = [0.25f32, 0.5, 0.125, 1.0];
    let mut rows = vec![0f32; idx.len() * d];
    launch(
        emu,
        "gather_rows",
        launch::elementwise(idx.len() * d),
        &mut [A::F32s(&mut src), A::I32s(&idx), A::F32s(&mut rows), A::I(idx.len() as i64), A::I(d as i64)],
    );
    for (i, &t) in idx.iter().enumerate() {
        assert_eq!(&rows[i * d..][..d], &src[t as usize * d..][..d]);
    }
    let mut acc = random(n_tok * d, 9, 1.0);
    let mut want = acc.clone();
    for (i, &t) in idx.iter().enumerate() {
        ops::axpy(gates[i], &src[t as usize * d..][..d], &mut want[t as usize * d..][..d]);
    }
    let mut g = gates.to_vec();
    launch(
        emu,
        "scatter_add_rows",
        launch::elementwise(idx.len() * d),
        &mut [
            A::F32s(&mut rows),
            A::I32s(&idx),
            A::F32s(&mut g),
            A::F32s(&mut acc),
            A::I(idx.len() as i64),
            A::I(d as i64),
        ],
    );
    assert!(max_diff(&acc, &want).0 <= 1e-6);
}

/// kv_write into a cache, then attention, through a prefill with pad tokens (the first query
/// sees no key) and two decode steps, against `attend`.
#[test]
fn kv_write_and_attention_match_the_cpu() {
    let emu = emu_or_skip!();
    for (n_q, n_kv, hd) in [(4usize, 2usize, 16usize), (6, 2, 128), (3, 3, 6)] {
        let c = GrokConfig {
            n_q_heads: n_q,
            n_kv_heads: n_kv,
            head_dim: hd,
            d_model: n_q * hd,
            ..GrokConfig::default()
        };
        let p = AttnParams::from_config(&c);
        let cap = 24;
        let (qd, kvd) = (n_q * hd, n_kv * hd);
        let (mut kc, mut vc) = (vec![0f32; n_kv * cap * hd], vec![0f32; n_kv * cap * hd]);
        let mut valid: Vec<bool> = Vec::new();
        let mut scratch = AttnScratch::default();
        let steps: [&[u32]; 3] = [&[0, 5, 9, 0, 12, 7, 3, 0, 44, 2, 8], &[3], &[0]];
        let mut p0 = 0;
        for (si, toks) in steps.iter().enumerate() {
            let t = toks.len();
            let seed = (si * 100 + hd + n_q) as u64;
            let (mut q, mut k, mut v) =
                (random(t * qd, seed, 2.0), random(t * kvd, seed + 1, 2.0), random(t * kvd, seed + 2, 1.0));
            valid.extend(toks.iter().map(|&x| x != 0));
            let g = launch::elementwise(t * kvd);
            let ints = [t, n_kv, hd, cap, p0].map(|x| A::I(x as i64));
            let mut args = vec![A::F32s(&mut k), A::F32s(&mut v), A::F32s(&mut kc), A::F32s(&mut vc)];
            args.extend(ints);
            launch(emu, "kv_write", g, &mut args);
            drop(args);
            // The cache layout, [kv head][position][lane], written independently.
            for tt in 0..t {
                for h in 0..n_kv {
                    let at = (h * cap + p0 + tt) * hd;
                    assert_eq!(&kc[at..at + hd], &k[tt * kvd + h * hd..][..hd], "kv_write keys");
                    assert_eq!(&vc[at..at + hd], &v[tt * kvd + h * hd..][..hd], "kv_write values");
                }
            }
            let mut want = vec![0f32; t * qd];
            attend(&p, &q, p0, &kc, &vc, cap, &valid, &mut want, &mut scratch);
            let mut mask: Vec<u8> = valid.iter().map(|&b| b as u8).collect();
            let mut out = vec![f32::NAN; t * qd];
            let g = launch::attention(n_q, t, hd, p0 + t);
            let mut args = vec![
                A::F32s(&mut q),
                A::F32s(&mut kc),
                A::F32s(&mut vc),
                A::Bytes(&mut mask),
                A::F32s(&mut out),
            ];
            args.extend([t, p0, n_q, n_kv, hd, cap].map(|x| A::I(x as i64)));
            args.extend([A::F(p.multiplier as f64), A::F(p.logit_cap as f64)]);
            launch(emu, "attention", g, &mut args);
            drop(args);
            let (e, i) = max_diff(&out, &want);
            assert!(e <= 2e-5, "heads {n_q}/{n_kv} x {hd}, step {si}: {} vs {} at {i}", out[i], want[i]);
            p0 += t;
        }
    }
}
