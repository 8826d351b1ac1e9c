//! Kernel throughput. Matrix-vector products are memory-bound, so they are reported in GB/s of
//! weight bytes (decimal) against `measure_read_bandwidth`, printed first; prefill products are
//! compute-bound and reported in tokens/s.
//!
//! Types: q8_0, iq4_nl, q4_k, q4_s, q3_s, q2_s (and bf16 where noted), each at 1 and 2 threads.
//! `stream` prints each type's bits per weight on disk, to turn its GB/s into weights per second
//! (the measure that compares types of different widths).
//!
//! * `stream`: one 8192 x 16384 matrix (larger than the last-level cache; a 4-bit one may still
//!   partly fit a very large one), with bf16.
//! * `decode`: the model's benchmark shapes (d_model 2048, ffn 8192) in decode order over more
//!   than 1 GB of distinct matrices, so that nothing is served from cache: per layer q, k, v, o
//!   and two experts (gate and up fused, then down); then the 131072 x 2048 output head.
//! * `matmul`: 128 tokens through an 8192 x 2048 expert matrix, with bf16.
//! * `small`: a 512 x 2048 matrix that stays in cache: per-call overhead and compute speed.
//!
//! On a shared machine the means move with the other load; compare runs made together.
//! * `dispatch`: an empty parallel job on the kernels' pool and on rayon.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use grok1::kernels::{self, Matrix};
use grok1::quant::QuantType;
use std::time::Duration;

const THREADS: [usize; 2] = [1, 2];

/// Random weights in the on-disk layout, with small normal-range scales (speed does not depend on
/// the values, but NaNs and denormals are kept out).
fn random_matrix(qtype: QuantType, rows: usize, cols: usize, seed: u64) -> Matrix {
    let len = qtype.row_bytes(cols).unwrap() * rows;
    let mut bytes = vec![0u8; len];
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in bytes.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&s.to_le_bytes()[..n]);
    }
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    match qtype {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl | QuantType::Q4S | QuantType::Q3S | QuantType::Q2S => {
            for block in bytes.chunks_mut(qtype.block_bytes()) {
                block[..2].copy_from_slice(&scale);
            }
        }
        QuantType::Q4K => {
            for block in bytes.chunks_mut(qtype.block_bytes()) {
                block[..2].copy_from_slice(&scale); // d
                block[2..4].copy_from_slice(&scale); // dmin
            }
        }
        QuantType::Bf16 => {
            for w in bytes.chunks_mut(2) {
                w[1] = 0x3c | (w[1] & 0x80); // magnitude about 2^-7
            }
        }
        QuantType::F32 => {
            for w in bytes.chunks_mut(4) {
                w[3] = 0x3c | (w[3] & 0x80);
            }
        }
    }
    Matrix::from_bytes(qtype, rows, cols, &bytes).unwrap()
}

fn input(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn roofline(_c: &mut Criterion) {
    eprintln!("kernels: {}", kernels::describe());
    for t in THREADS {
        eprintln!("read bandwidth, {t} thread(s): {:.1} GB/s", kernels::measure_read_bandwidth(t) / 1e9);
    }
}

fn stream(c: &mut Criterion) {
    let (rows, cols) = (8192, 16384);
    for qtype in [QuantType::Q8_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S, QuantType::Bf16] {
        let m = random_matrix(qtype, rows, cols, 1);
        eprintln!("{qtype}: {} bits per weight on disk", qtype.bits_per_weight());
        let x = input(cols);
        let mut y = vec![0f32; rows];
        let mut g = c.benchmark_group(format!("stream/{qtype}"));
        g.throughput(Throughput::BytesDecimal(m.nbytes() as u64));
        for t in THREADS {
            kernels::set_threads(t);
            g.bench_function(format!("{rows}x{cols}/{t}t"), |b| b.iter(|| m.matvec(&x, &mut y)));
        }
        g.finish();
    }
    kernels::set_threads(0);
}

struct Layer {
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    experts: Vec<[Matrix; 3]>,
}

fn decode(c: &mut Criterion) {
    let (d, ffn, kv) = (2048, 8192, 512);
    for qtype in [QuantType::Q8_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S] {
        let mut seed = 100;
        let mut next = |rows, cols| {
            seed += 1;
            random_matrix(qtype, rows, cols, seed)
        };
        let mut layers = Vec::new();
        let mut bytes = 0usize;
        while bytes < 1_100_000_000 {
            let l = Layer {
                q: next(d, d),
                k: next(kv, d),
                v: next(kv, d),
                o: next(d, d),
                experts: (0..2).map(|_| [next(ffn, d), next(ffn, d), next(d, ffn)]).collect(),
            };
            bytes += [&l.q, &l.k, &l.v, &l.o].iter().map(|m| m.nbytes()).sum::<usize>();
            bytes += l.experts.iter().flatten().map(|m| m.nbytes()).sum::<usize>();
            layers.push(l);
        }
        let head = next(131072, d);
        let x = input(d);
        let (mut yq, mut yk, mut yv) = (vec![0f32; d], vec![0f32; kv], vec![0f32; kv]);
        let (mut gate, mut up, mut down) = (vec![0f32; ffn], vec![0f32; ffn], vec![0f32; d]);
        let mut logits = vec![0f32; 131072];
        let mut g = c.benchmark_group(format!("decode/{qtype}"));
        g.throughput(Throughput::BytesDecimal(bytes as u64));
        for t in THREADS {
            kernels::set_threads(t);
            g.bench_function(format!("{}layers/{t}t", layers.len()), |b| {
                b.iter(|| {
                    for l in &layers {
                        l.q.matvec(&x, &mut yq);
                        l.k.matvec(&x, &mut yk);
                        l.v.matvec(&x, &mut yv);
                        l.o.matvec(&yq, &mut down);
                        for [wg, wu, wd] in &l.experts {
                            Matrix::matvec_pair(wg, wu, &x, &mut gate, &mut up);
                            wd.matvec(&gate, &mut down);
                        }
                    }
                })
            });
        }
        g.throughput(Throughput::BytesDecimal(head.nbytes() as u64));
        for t in THREADS {
            kernels::set_threads(t);
            g.bench_function(format!("head131072x{d}/{t}t"), |b| b.iter(|| head.matvec(&x, &mut logits)));
        }
        g.finish();
    }
    kernels::set_threads(0);
}

fn matmul(c: &mut Criterion) {
    let (rows, cols, n) = (8192, 2048, 128);
    for qtype in [QuantType::Q8_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S, QuantType::Bf16] {
        let m = random_matrix(qtype, rows, cols, 7);
        let xs = input(n * cols);
        let mut ys = vec![0f32; n * rows];
        let mut g = c.benchmark_group(format!("matmul/{qtype}"));
        g.throughput(Throughput::Elements(n as u64));
        for t in THREADS {
            kernels::set_threads(t);
            g.bench_function(format!("{rows}x{cols}x{n}/{t}t"), |b| b.iter(|| m.matmul(&xs, n, &mut ys)));
        }
        g.finish();
    }
    kernels::set_threads(0);
}

fn small(c: &mut Criterion) {
    let (rows, cols) = (512, 2048);
    for qtype in [QuantType::Q8_0, QuantType::Iq4Nl, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S, QuantType::Bf16] {
        let m = random_matrix(qtype, rows, cols, 9);
        let x = input(cols);
        let mut y = vec![0f32; rows];
        let mut g = c.benchmark_group(format!("small/{qtype}"));
        g.throughput(Throughput::BytesDecimal(m.nbytes() as u64));
        for t in THREADS {
            kernels::set_threads(t);
            g.bench_function(format!("{rows}x{cols}/{t}t"), |b| b.iter(|| m.matvec(&x, &mut y)));
        }
        g.finish();
    }
    kernels::set_threads(0);
}

/// The cost of handing out work: an empty job of one chunk per thread, on our pool and on rayon.
fn dispatch(c: &mut Criterion) {
    use rayon::prelude::*;
    let mut g = c.benchmark_group("dispatch");
    let n = kernels::threads();
    g.bench_function(format!("pool/{n}t"), |b| {
        b.iter(|| kernels::parallel_for(n, &|i| {
            std::hint::black_box(i);
        }))
    });
    g.bench_function(format!("rayon/{}t", rayon::current_num_threads()), |b| {
        b.iter(|| (0..n).into_par_iter().for_each(|i| {
            std::hint::black_box(i);
        }))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = roofline, dispatch, stream, decode, matmul, small
}
criterion_main!(benches);
