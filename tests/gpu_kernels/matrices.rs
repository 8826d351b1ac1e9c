//! `DeviceMatrix` products of every block type against `QuantType::dequantize_row` and an f64
//! dot product, for both kernels, odd shapes and batch sizes.

use super::random;
use grok1::gpu::{DeviceMatrix, MatKernel};
use grok1::quant::QuantType;

fn shapes(q: QuantType) -> &'static [(usize, usize)] {
    match q {
        QuantType::F32 | QuantType::Bf16 => &[(1, 1), (3, 7), (37, 33), (130, 256), (257, 1000), (64, 2048)],
        QuantType::Q4K | QuantType::Q4S => &[(1, 256), (3, 768), (37, 1280), (130, 2048), (65, 4096)],
        _ => &[(1, 32), (3, 96), (37, 288), (130, 1024), (257, 2048), (70, 4096)],
    }
}

#[test]
fn products_match_the_cpu_for_every_type_shape_and_batch() {
    let gpu = crate::gpu_or_skip!();
    for q in QuantType::ALL {
        if grok1::gpu::layout::unsupported(q).is_some() {
            continue; // no device kernel: such matrices stay on the CPU
        }
        let mut worst = 0f64;
        for &(rows, cols) in shapes(q) {
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
            let m = DeviceMatrix::upload(&gpu, q, rows, cols, &bytes).unwrap();
            assert_eq!(m.nbytes(), bytes.len() as u64, "{q}: device bytes");
            for n in [1usize, 2, 5, 64, 67] {
                let xs = random(n * cols, (n * 31 + cols) as u64, 1.0);
                for kernel in [MatKernel::Matvec, MatKernel::Tiled, MatKernel::Auto] {
                    let ys = m.matmul_host(&gpu, &xs, n, kernel).unwrap();
                    for t in 0..n {
                        let x = &xs[t * cols..][..cols];
                        for r in 0..rows {
                            let wr = &deq[r * cols..][..cols];
                            let want: f64 = wr.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let mag: f64 = wr.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                            let got = ys[t * rows + r] as f64;
                            let rel = (got - want).abs() / (mag + 1e-30);
                            worst = worst.max(rel);
                            assert!(
                                (got - want).abs() <= 1e-5 * mag + 1e-6,
                                "{q} [{rows}, {cols}] n={n} {kernel:?}: token {t} row {r}: {got} vs {want} (|wx| sum {mag})"
                            );
                        }
                    }
                }
            }
        }
        eprintln!("{q}: largest error {worst:.2e} of sum |w x|");
    }
}

#[test]
fn products_on_views_leave_the_rest_of_the_buffer_alone() {
    let gpu = crate::gpu_or_skip!();
    let (rows, cols) = (40, 64);
    let q = QuantType::Q8_0;
    let w = random(rows * cols, 3, 1.0);
    let mut bytes = vec![0u8; rows * q.row_bytes(cols).unwrap()];
    for (r, o) in w.chunks_exact(cols).zip(bytes.chunks_exact_mut(q.row_bytes(cols).unwrap())) {
        q.quantize_row(r, o);
    }
    let m = DeviceMatrix::upload(&gpu, q, rows, cols, &bytes).unwrap();
    let x = random(3 * cols, 4, 1.0);
    let want = m.matmul_host(&gpu, &x[cols..2 * cols], 1, MatKernel::Auto).unwrap();
    // Input from the middle of a buffer, output into the middle of a sentinel-filled buffer.
    let xd = gpu.upload(&x).unwrap();
    let mut yd = gpu.upload(&vec![7.0f32; 3 * rows]).unwrap();
    m.matvec(&gpu, &xd.slice(cols..2 * cols), &mut yd.slice_mut(rows..2 * rows)).unwrap();
    let y = gpu.download(&yd).unwrap();
    assert!(y[..rows].iter().chain(&y[2 * rows..]).all(|&v| v == 7.0));
    assert_eq!(&y[rows..2 * rows], &want[..]);
    // Too small an output buffer is an error, not a write past its end.
    let e = m.matvec(&gpu, &xd.slice(0..cols), &mut yd.slice_mut(0..rows - 1)).unwrap_err().to_string();
    assert!(e.contains("outputs"), "{e}");
    // A view starting one float into a buffer cannot feed the float4 loads.
    let e = m.matvec(&gpu, &xd.slice(1..cols + 1), &mut yd.slice_mut(0..rows)).unwrap_err().to_string();
    assert!(e.contains("not 16-byte aligned"), "{e}");
}
