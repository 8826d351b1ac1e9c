//! Quantizer and dequantizer throughput, one thread, for every block type.
//! Run: `cargo bench --bench quant`; `cargo bench --bench quant -- q4_s` measures only the types
//! whose name contains `q4_s` (criterion's filter, which the table follows too).
//!
//! Two measurements: first a table in weights per second of the thread's own CPU time (what one
//! core sustains, unaffected by other processes competing for the cores), then criterion's
//! wall-clock timings.

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use grok1::quant::measure::{sample, Dist};
use grok1::quant::QuantType;
use std::time::Duration;

const COLS: usize = 4096;
const ROWS: usize = 64;

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best of five runs of at least 0.3 CPU-seconds each: weights per CPU-second.
fn per_cpu_second(n: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = thread_cpu_seconds();
        let mut reps = 0u32;
        while thread_cpu_seconds() - t0 < 0.3 {
            f();
            reps += 1;
        }
        best = best.min((thread_cpu_seconds() - t0) / reps as f64);
    }
    n as f64 / best
}

fn cpu_time_table(w: &[f32], filter: Option<&str>) {
    println!("one thread, weights per CPU-second (rows of {COLS}, gaussian):");
    println!("{:8} {:>14} {:>14}", "type", "quantize", "dequantize");
    for t in QuantType::ALL {
        if filter.is_some_and(|f| !t.name().contains(f)) {
            continue;
        }
        let rb = t.row_bytes(COLS).unwrap();
        let mut bytes = vec![0u8; rb * ROWS];
        let q = per_cpu_second(w.len(), || {
            for (row, o) in w.chunks_exact(COLS).zip(bytes.chunks_exact_mut(rb)) {
                t.quantize_row(black_box(row), o);
            }
            black_box(&bytes);
        });
        let mut back = vec![0f32; w.len()];
        let d = per_cpu_second(w.len(), || {
            for (b, o) in bytes.chunks_exact(rb).zip(back.chunks_exact_mut(COLS)) {
                t.dequantize_row(black_box(b), o);
            }
            black_box(&back);
        });
        println!("{:8} {:>12.0} M {:>12.0} M", t.name(), q / 1e6, d / 1e6);
    }
}

fn wall_clock(c: &mut Criterion, w: &[f32]) {
    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Elements(w.len() as u64));
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
    g.throughput(Throughput::Elements(w.len() as u64));
    g.measurement_time(Duration::from_secs(2));
    for t in QuantType::ALL {
        let rb = t.row_bytes(COLS).unwrap();
        let mut bytes = vec![0u8; rb * ROWS];
        for (row, o) in w.chunks_exact(COLS).zip(bytes.chunks_exact_mut(rb)) {
            t.quantize_row(row, o);
        }
        let mut back = vec![0f32; w.len()];
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

fn main() {
    let w = sample(Dist::Gaussian, ROWS * COLS, 1);
    let mut c = Criterion::default().configure_from_args();
    // `cargo test --benches` runs this in test mode: skip the slow table there.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--test" || a == "--list") {
        // Criterion's filter is its one positional argument (`cargo bench` also passes `--bench`).
        let filter = args
            .iter()
            .find(|a| !a.starts_with('-'))
            .map(String::as_str);
        cpu_time_table(&w, filter);
    }
    wall_clock(&mut c, &w);
    c.final_summary();
}
