//! A plain f32 Grok-1 forward pass (docs/grok1-model.md section 2), kept deliberately naive, that
//! reports the statistics which tell a plausible random model from a degenerate one.

use grok1::checkpoint::{Proj, Tensor, TensorSource};

pub struct Stats {
    /// RMS of the residual stream after each layer (mean over positions).
    pub residual_rms: Vec<f64>,
    /// Std of the capped attention logits.
    pub attn_logit_std: f64,
    /// Attention entropy over ln(number of keys), mean over heads and positions >= 8.
    pub attn_entropy_ratio: f64,
    /// `[layer][expert]`: share of the top-k selections.
    pub expert_share: Vec<Vec<f64>>,
    /// Mean router probability of the top-1 expert.
    pub top1_prob: f64,
    pub logit_std: f64,
    /// Distinct argmax tokens over the positions.
    pub distinct_argmax: usize,
    /// Share of positions whose argmax is the input token itself.
    pub copy_rate: f64,
}

fn load(src: &dyn TensorSource, t: Tensor) -> Vec<f32> {
    let n: usize = t.shape(src.config()).iter().product();
    let mut v = vec![0f32; n];
    src.read_rows(t, 0, &mut v).unwrap();
    v
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms_norm(x: &[f32], scale: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(scale).map(|(v, s)| (*v as f64 * r) as f32 * s).collect()
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

fn gelu(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// Rotate-half RoPE over each head of `x` at position `pos`.
fn rope(x: &mut [f32], head_dim: usize, pos: usize, theta: f64) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let f = pos as f64 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let (s, c) = (f.sin() as f32, f.cos() as f32);
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

pub fn run(src: &dyn TensorSource, tokens: &[u32]) -> Stats {
    let c = src.config().clone();
    let (d, hd, t_len) = (c.d_model, c.head_dim, tokens.len());
    let emb = load(src, Tensor::Embedding);
    let mut h: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            emb[t as usize * d..][..d].iter().map(|v| v * c.embedding_multiplier as f32).collect()
        })
        .collect();
    let (mut logit_sum, mut logit_sq, mut logit_n) = (0f64, 0f64, 0f64);
    let (mut ent_sum, mut ent_n) = (0f64, 0f64);
    let (mut top1_sum, mut top1_n) = (0f64, 0f64);
    let mut residual_rms = vec![];
    let mut expert_share = vec![];
    for l in 0..c.n_layers {
        let [n0, n1, n2, n3] = [
            Tensor::AttnNorm(l),
            Tensor::AttnOutNorm(l),
            Tensor::FfnNorm(l),
            Tensor::FfnOutNorm(l),
        ]
        .map(|t| load(src, t));
        let (wq, wk, wv, wo) = (
            load(src, Tensor::AttnQ(l)),
            load(src, Tensor::AttnK(l)),
            load(src, Tensor::AttnV(l)),
            load(src, Tensor::AttnO(l)),
        );
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (p, x) in h.iter().enumerate() {
            let xn = rms_norm(x, &n0, c.rms_norm_eps);
            let mut q = matvec(&wq, &xn);
            let mut k = matvec(&wk, &xn);
            rope(&mut q, hd, p, c.rope_theta);
            rope(&mut k, hd, p, c.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &xn));
        }
        let group = c.n_q_heads / c.n_kv_heads;
        for p in 0..t_len {
            let mut out = vec![0f32; c.q_dim()];
            for head in 0..c.n_q_heads {
                let kvh = head / group;
                let q = &qs[p][head * hd..][..hd];
                let logits: Vec<f64> = (0..=p)
                    .map(|s| {
                        let k = &ks[s][kvh * hd..][..hd];
                        let dot: f64 = q.iter().zip(k).map(|(a, b)| (*a * *b) as f64).sum();
                        let x = dot * c.attn_output_multiplier;
                        c.attn_logit_cap * (x / c.attn_logit_cap).tanh()
                    })
                    .collect();
                logit_sum += logits.iter().sum::<f64>();
                logit_sq += logits.iter().map(|x| x * x).sum::<f64>();
                logit_n += logits.len() as f64;
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                if p >= 8 {
                    let ent: f64 =
                        e.iter().map(|v| v / z).filter(|w| *w > 0.0).map(|w| -w * w.ln()).sum();
                    ent_sum += ent / ((p + 1) as f64).ln();
                    ent_n += 1.0;
                }
                for (s, w) in e.iter().enumerate() {
                    let v = &vs[s][kvh * hd..][..hd];
                    for (o, vv) in out[head * hd..][..hd].iter_mut().zip(v) {
                        *o += (w / z) as f32 * vv;
                    }
                }
            }
            let a = matvec(&wo, &out);
            let a = rms_norm(&a, &n1, c.rms_norm_eps);
            h[p].iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        }

        let router = load(src, Tensor::Router(l));
        let experts: Vec<[Vec<f32>; 3]> = (0..c.n_experts)
            .map(|e| Proj::ALL.map(|proj| load(src, Tensor::Expert { layer: l, expert: e, proj })))
            .collect();
        let mut counts = vec![0f64; c.n_experts];
        for x in h.iter_mut() {
            let xn = rms_norm(x, &n2, c.rms_norm_eps);
            let rl = matvec(&router, &xn);
            let m = rl.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f64> = rl.iter().map(|v| ((v - m) as f64).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut order: Vec<usize> = (0..c.n_experts).collect();
            order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap().then(a.cmp(&b)));
            top1_sum += e[order[0]] / z;
            top1_n += 1.0;
            let mut y = vec![0f32; d];
            for &ex in &order[..c.n_experts_per_token] {
                counts[ex] += 1.0;
                let g = (e[ex] / z) as f32;
                let [wg, wu, wd] = &experts[ex];
                let hid: Vec<f32> = matvec(wg, &xn)
                    .iter()
                    .zip(matvec(wu, &xn))
                    .map(|(a, b)| gelu(*a) * b)
                    .collect();
                y.iter_mut().zip(matvec(wd, &hid)).for_each(|(o, v)| *o += g * v);
            }
            let y = rms_norm(&y, &n3, c.rms_norm_eps);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        let total: f64 = counts.iter().sum();
        expert_share.push(counts.iter().map(|n| n / total).collect());
        residual_rms.push(h.iter().map(|x| rms(x)).sum::<f64>() / t_len as f64);
    }

    let nf = load(src, Tensor::OutputNorm);
    let (mut ls, mut lsq, mut ln) = (0f64, 0f64, 0f64);
    let mut argmax = vec![];
    for x in &h {
        let xn = rms_norm(x, &nf, c.rms_norm_eps);
        let logits: Vec<f32> =
            matvec(&emb, &xn).iter().map(|v| v * c.output_multiplier as f32).collect();
        ls += logits.iter().map(|v| *v as f64).sum::<f64>();
        lsq += logits.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        ln += logits.len() as f64;
        let best =
            (0..logits.len()).max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap()).unwrap();
        argmax.push(best);
    }
    let copies = argmax.iter().zip(tokens).filter(|(a, t)| **a == **t as usize).count();
    argmax.sort();
    argmax.dedup();
    let std = |s: f64, sq: f64, n: f64| (sq / n - (s / n).powi(2)).sqrt();
    Stats {
        residual_rms,
        attn_logit_std: std(logit_sum, logit_sq, logit_n),
        attn_entropy_ratio: ent_sum / ent_n,
        expert_share,
        top1_prob: top1_sum / top1_n,
        logit_std: std(ls, lsq, ln),
        distinct_argmax: argmax.len(),
        copy_rate: copies as f64 / t_len as f64,
    }
}
