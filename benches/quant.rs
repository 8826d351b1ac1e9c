//! Quantizer throughput (weights per second, one thread) for every block type, plus the error
//! table of `formats/blocks.md`. Run: `cargo bench --bench quant`.

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use grok1::quant::measure::{measure, sample, Dist};
use grok1::quant::QuantType;
use std::time::Duration;

const COLS: usize = 4096;
const ROWS: usize = 64;

fn throughput(c: &mut Criterion) {
    let w = sample(Dist::Gaussian, ROWS * COLS, 1);
    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Elements((ROWS * COLS) as u64));
    g.measurement_time(Duration::from_secs(3));
    for t in QuantType::ALL {
        let rb = t.row_bytes(COLS).unwrap();
        let mut out = vec![0u8; rb * ROWS];
        g.bench_function(BenchmarkId::from_parameter(t), |b| {
            b.iter(|| {
                for (row, o) in w.chunks_exact(COLS).zip(out.chunks_exact_mut(rb)) {
                    t.quantize_row(black_box(row), o);
                }
                black_box(&out);
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("dequantize");
    g.throughput(Throughput::Elements((ROWS * COLS) as u64));
    g.measurement_time(Duration::from_secs(2));
    for t in QuantType::ALL {
        let rb = t.row_bytes(COLS).unwrap();
        let mut bytes = vec![0u8; rb * ROWS];
        for (row, o) in w.chunks_exact(COLS).zip(bytes.chunks_exact_mut(rb)) {
            t.quantize_row(row, o);
        }
        let mut back = vec![0f32; ROWS * COLS];
        g.bench_function(BenchmarkId::from_parameter(t), |b| {
            b.iter(|| {
                for (bs, o) in bytes.chunks_exact(rb).zip(back.chunks_exact_mut(COLS)) {
                    t.dequantize_row(black_box(bs), o);
                }
                black_box(&back);
            })
        });
    }
    g.finish();
}

fn error_table() {
    let n = 256 * COLS;
    println!("relative RMSE (RMSE / weight RMS) and RMSE relative to q4_0, {n} weights each");
    for dist in [Dist::Gaussian, Dist::StudentT(3), Dist::StudentT(5), Dist::Laplace] {
        let w = sample(dist, n, 7);
        let base = measure(QuantType::Q4_0, &w, COLS);
        let mut line = format!("{:14}", dist.name());
        for t in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K] {
            let s = measure(t, &w, COLS);
            line += &format!(" | {t} {:.4} ({:.3}x)", s.relative_rmse(), s.rmse() / base.rmse());
        }
        println!("{line}");
    }
}

fn main() {
    error_table();
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c);
    c.final_summary();
}
