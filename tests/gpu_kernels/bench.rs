//! Throughput of the matrix kernels on Grok-1-sized matrices (ignored by default; the GPU check
//! script runs it with `--ignored --nocapture`). Decode is bound by memory bandwidth, so the
//! matvec line is reported in GB/s of weights read; prefill in TFLOP/s.

use grok1::gpu::{DeviceMatrix, MatKernel};
use grok1::quant::QuantType;
use std::time::Instant;

/// Random bytes with every f16 scale set to a small normal value: the kernels' speed does not
/// depend on the values, but NaNs would make the output useless as a sanity check.
fn fake_weights(q: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * q.row_bytes(cols).unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 & 0x3f
        })
        .collect();
    let bb = q.block_bytes();
    if matches!(q, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl | QuantType::Q4K | QuantType::Q4S) {
        for b in v.chunks_exact_mut(bb) {
            b[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            if q == QuantType::Q4K {
                b[2..4].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
            }
        }
    }
    v
}

#[test]
#[ignore]
fn matrix_kernel_throughput() {
    let gpu = crate::gpu_or_skip!();
    // An expert's gate projection of Grok-1: [ffn, d_model].
    let (rows, cols) = (32768usize, 6144usize);
    println!("matrix [{rows}, {cols}] on {}", gpu.info().name);
    println!("{:<8} {:>10} {:>14} {:>16}", "type", "MB", "matvec GB/s", "matmul TFLOP/s");
    for q in [QuantType::Bf16, QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S] {
        let bytes = fake_weights(q, rows, cols);
        let m = DeviceMatrix::upload(&gpu, q, rows, cols, &bytes).unwrap();
        let x = gpu.upload(&vec![0.5f32; 128 * cols]).unwrap();
        let mut y = gpu.zeros::<f32>(128 * rows).unwrap();
        let run = |n: usize, kernel: MatKernel, y: &mut cudarc::driver::CudaSlice<f32>, reps: usize| -> f64 {
            m.matmul_with(&gpu, &x.slice(0..n * cols), n, &mut y.slice_mut(0..n * rows), kernel).unwrap();
            gpu.synchronize().unwrap();
            let t = Instant::now();
            let start = gpu.mark().unwrap();
            for _ in 0..reps {
                m.matmul_with(&gpu, &x.slice(0..n * cols), n, &mut y.slice_mut(0..n * rows), kernel).unwrap();
            }
            let end = gpu.mark().unwrap();
            let device = start.seconds_to(&end).unwrap();
            let host = t.elapsed().as_secs_f64();
            // Device time can only be shorter than the host's wait for the same work.
            assert!(device > 0.0 && device <= host * 1.01 + 1e-4, "device {device} s, host {host} s");
            device / reps as f64
        };
        let tv = run(1, MatKernel::Matvec, &mut y, 50);
        let tm = run(128, MatKernel::Tiled, &mut y, 5);
        let out = gpu.download(&y).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{q}: non-finite output");
        println!(
            "{:<8} {:>10.1} {:>14.1} {:>16.2}",
            q.name(),
            bytes.len() as f64 / 1e6,
            m.nbytes() as f64 / tv / 1e9,
            2.0 * (rows * cols * 128) as f64 / tm / 1e12
        );
    }
}
