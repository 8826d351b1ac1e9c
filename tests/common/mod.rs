//! Shared by the model tests: fixtures, comparison statistics, and a naive float64 forward pass
//! written straight from the specification (no cache, no batching, no grouping by expert).
#![allow(dead_code)]

use grok1::checkpoint::SafetensorsSource;
use grok1::kernels::Matrix;
use grok1::model::{Model, Weights};
use grok1::npy;
use grok1::quant::QuantType;
use grok1::GrokConfig;
use std::path::{Path, PathBuf};

pub struct Fixture {
    pub name: &'static str,
    pub dir: PathBuf,
    pub logits: PathBuf,
    pub tokens: PathBuf,
    /// Whether `tokens.json`'s greedy continuation was generated with these weights.
    pub own_continuation: bool,
}

pub struct Tokens {
    pub prompt: Vec<u32>,
    pub continuation: Vec<u32>,
    pub all: Vec<u32>,
}

const MICRO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/micro");
const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/tiny");

pub fn micro_hf() -> Fixture {
    Fixture {
        name: "micro/hf",
        dir: Path::new(MICRO).join("hf"),
        logits: Path::new(MICRO).join("logits.npy"),
        tokens: Path::new(MICRO).join("tokens.json"),
        own_continuation: true,
    }
}

/// Other weights, same tokens: the logits were computed on `micro/tokens.json`'s `all_tokens`.
pub fn micro_hpcai() -> Fixture {
    Fixture {
        name: "micro/hf-hpcai",
        dir: Path::new(MICRO).join("hf-hpcai"),
        logits: Path::new(MICRO).join("logits-hf-hpcai.npy"),
        tokens: Path::new(MICRO).join("tokens.json"),
        own_continuation: false,
    }
}

/// The tiny fixture lives outside the crate; `None` (with the reason printed) when it is absent.
pub fn tiny_hf() -> Option<Fixture> {
    let f = Fixture {
        name: "tiny/hf",
        dir: Path::new(TINY).join("hf"),
        logits: Path::new(TINY).join("logits.npy"),
        tokens: Path::new(TINY).join("tokens.json"),
        own_continuation: true,
    };
    if f.dir.join("config.json").is_file() && f.logits.is_file() {
        Some(f)
    } else {
        eprintln!("skipping tiny/hf: {} not found (shared fixtures absent)", f.dir.display());
        None
    }
}

pub fn all_fixtures() -> Vec<Fixture> {
    let mut v = vec![micro_hf(), micro_hpcai()];
    v.extend(tiny_hf());
    v
}

impl Fixture {
    pub fn tokens(&self) -> Tokens {
        let text = std::fs::read_to_string(&self.tokens).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = |k: &str| -> Vec<u32> {
            v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        Tokens { prompt: ids("prompt"), continuation: ids("greedy_continuation"), all: ids("all_tokens") }
    }

    pub fn golden(&self) -> npy::NpyArray {
        npy::read(&self.logits).unwrap()
    }

    pub fn weights(&self, dense: QuantType, experts: QuantType) -> Weights {
        let src = SafetensorsSource::open(&self.dir).unwrap();
        Weights::from_source(&src, dense, experts).unwrap()
    }

    pub fn config(&self) -> GrokConfig {
        GrokConfig::from_hf_json(&self.dir.join("config.json")).unwrap()
    }

    pub fn model(&self, dense: QuantType, experts: QuantType) -> Model {
        Model::new(self.config(), self.weights(dense, experts)).unwrap()
    }
}

/// How far `ours` (`[T, V]`) is from `golden` (`[T, V]`).
#[derive(Debug, Clone, Copy)]
pub struct Agreement {
    pub max_abs: f64,
    /// Mean over positions of KL(softmax(golden) || softmax(ours)), in nats.
    pub mean_kl: f64,
    /// Median over positions of the same; insensitive to a few routing flips.
    pub median_kl: f64,
    /// Fraction of positions whose argmax agrees.
    pub top1: f64,
}

pub fn compare(golden: &npy::NpyArray, ours: &[f32]) -> Agreement {
    let (t_n, v) = (golden.shape[0], golden.shape[1]);
    assert_eq!(ours.len(), t_n * v, "logit shape");
    let mut max_abs = 0f64;
    let mut kls = Vec::with_capacity(t_n);
    let mut agree = 0;
    for t in 0..t_n {
        let g = golden.row(t);
        let o: Vec<f64> = ours[t * v..][..v].iter().map(|&x| x as f64).collect();
        for (a, b) in g.iter().zip(&o) {
            max_abs = max_abs.max((a - b).abs());
        }
        let (lg, lo) = (log_softmax(g), log_softmax(&o));
        kls.push(lg.iter().zip(&lo).map(|(p, q)| p.exp() * (p - q)).sum::<f64>());
        agree += (argmax(g) == argmax(&o)) as usize;
    }
    let mean_kl = kls.iter().sum::<f64>() / t_n as f64;
    kls.sort_by(f64::total_cmp);
    let median_kl = if t_n % 2 == 1 { kls[t_n / 2] } else { 0.5 * (kls[t_n / 2 - 1] + kls[t_n / 2]) };
    Agreement { max_abs, mean_kl, median_kl, top1: agree as f64 / t_n as f64 }
}

/// KL(softmax(golden) || softmax(ours)) at each position, in nats.
pub fn kl_per_position(golden: &npy::NpyArray, ours: &[f32]) -> Vec<f64> {
    let v = golden.shape[1];
    assert_eq!(ours.len(), golden.shape[0] * v, "logit shape");
    (0..golden.shape[0])
        .map(|t| {
            let o: Vec<f64> = ours[t * v..][..v].iter().map(|&x| x as f64).collect();
            let (lg, lo) = (log_softmax(golden.row(t)), log_softmax(&o));
            lg.iter().zip(&lo).map(|(p, q)| p.exp() * (p - q)).sum()
        })
        .collect()
}

/// A paired comparison of per-position KLs at the same positions: the mean over positions of
/// `kl[t] - factor * base[t]`, and twice its standard error. `kl` is measurably worse than
/// `factor` times `base` (at about 98% confidence) when the mean exceeds the second number.
pub fn paired_excess(kl: &[f64], base: &[f64], factor: f64) -> (f64, f64) {
    assert_eq!(kl.len(), base.len());
    let d: Vec<f64> = kl.iter().zip(base).map(|(a, b)| a - factor * b).collect();
    let n = d.len() as f64;
    let m = d.iter().sum::<f64>() / n;
    let se = (d.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt();
    (m, 2.0 * se)
}

pub fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

pub fn argmax(x: &[f64]) -> usize {
    let mut b = 0;
    for i in 1..x.len() {
        if x[i] > x[b] {
            b = i;
        }
    }
    b
}

// ---------------------------------------------------------------- naive reference forward --

fn dense(m: &Matrix) -> Vec<Vec<f64>> {
    let mut row = vec![0f32; m.cols];
    (0..m.rows)
        .map(|r| {
            m.row_f32(r, &mut row);
            row.iter().map(|&x| x as f64).collect()
        })
        .collect()
}

/// `W x` with `W` as rows `[out][in]`.
fn mv(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter().map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn norm(x: &[f64], scale: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    x.iter().zip(scale).map(|(v, &s)| s as f64 * v / (ms + eps).sqrt()).collect()
}

/// Rotate-half RoPE of one head, written as rotations of the lane pairs (i, i + hd/2).
fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let hd = x.len();
    for i in 0..hd / 2 {
        let a = pos as f64 * theta.powf(-((2 * i) as f64) / hd as f64);
        let (re, im) = (x[i], x[i + hd / 2]);
        x[i] = re * a.cos() - im * a.sin();
        x[i + hd / 2] = im * a.cos() + re * a.sin();
    }
}

/// Logits `[T][V]` of the whole sequence at once, in f64, from the weights the model holds.
/// `mask_pads = false` lets pad keys be attended to (to show that masking matters).
pub fn naive_forward(c: &GrokConfig, w: &Weights, tokens: &[u32], mask_pads: bool) -> Vec<Vec<f64>> {
    let (t_n, d, hd) = (tokens.len(), c.d_model, c.head_dim);
    let (h_n, kv_n) = (c.n_q_heads, c.n_kv_heads);
    let emb = dense(&w.embedding);
    let mut h: Vec<Vec<f64>> =
        tokens.iter().map(|&t| emb[t as usize].iter().map(|x| x * c.embedding_multiplier).collect()).collect();
    for (l, lw) in w.layers.iter().enumerate() {
        let (wq, wk, wv, wo) = (dense(&lw.q), dense(&lw.k), dense(&lw.v), dense(&lw.o));
        let xn: Vec<Vec<f64>> = h.iter().map(|x| norm(x, &lw.attn_norm, c.rms_norm_eps)).collect();
        let mut q: Vec<Vec<f64>> = xn.iter().map(|x| mv(&wq, x)).collect();
        let mut k: Vec<Vec<f64>> = xn.iter().map(|x| mv(&wk, x)).collect();
        let v: Vec<Vec<f64>> = xn.iter().map(|x| mv(&wv, x)).collect();
        for t in 0..t_n {
            q[t].chunks_mut(hd).for_each(|hq| rope(hq, t, c.rope_theta));
            k[t].chunks_mut(hd).for_each(|hk| rope(hk, t, c.rope_theta));
        }
        let mut attn = vec![vec![0f64; h_n * hd]; t_n];
        for (t, out) in attn.iter_mut().enumerate() {
            for j in 0..h_n {
                let g = j / (h_n / kv_n);
                let qh = &q[t][j * hd..][..hd];
                let logits: Vec<f64> = (0..t_n)
                    .map(|s| {
                        let ok = s <= t && (!mask_pads || tokens[s] != c.pad_token_id);
                        if !ok {
                            return -1e30;
                        }
                        let x: f64 = qh.iter().zip(&k[s][g * hd..][..hd]).map(|(a, b)| a * b).sum();
                        let x = x * c.attn_output_multiplier;
                        c.attn_logit_cap * (x / c.attn_logit_cap).tanh()
                    })
                    .collect();
                let p: Vec<f64> = log_softmax(&logits).iter().map(|x| x.exp()).collect();
                for s in 0..t_n {
                    for i in 0..hd {
                        out[j * hd + i] += p[s] * v[s][g * hd + i];
                    }
                }
            }
        }
        for t in 0..t_n {
            let a = mv(&wo, &attn[t]);
            let a = norm(&a, &lw.attn_out_norm, c.rms_norm_eps);
            h[t].iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        }
        for ht in h.iter_mut() {
            let x = norm(ht, &lw.ffn_norm, c.rms_norm_eps);
            let r: Vec<f64> = lw.router.chunks(d).map(|row| row.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum()).collect();
            let p: Vec<f64> = log_softmax(&r).iter().map(|x| x.exp()).collect();
            let mut order: Vec<usize> = (0..c.n_experts).collect();
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap()); // stable: ties keep index order
            let mut m = vec![0f64; d];
            for &e in &order[..c.n_experts_per_token] {
                let ew = w.expert(l, e);
                let (g, u, dn) = (dense(&ew.gate), dense(&ew.up), dense(&ew.down));
                let hid: Vec<f64> = mv(&g, &x)
                    .iter()
                    .zip(mv(&u, &x))
                    .map(|(a, b)| {
                        let gelu = 0.5 * a * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a * a * a)).tanh());
                        gelu * b
                    })
                    .collect();
                mv(&dn, &hid).iter().zip(m.iter_mut()).for_each(|(y, acc)| *acc += p[e] * y);
            }
            let m = norm(&m, &lw.ffn_out_norm, c.rms_norm_eps);
            ht.iter_mut().zip(&m).for_each(|(x, y)| *x += y);
        }
    }
    h.iter()
        .map(|x| {
            let hn = norm(x, &w.output_norm, c.rms_norm_eps);
            mv(&emb, &hn).iter().map(|y| y * c.output_multiplier).collect()
        })
        .collect()
}
