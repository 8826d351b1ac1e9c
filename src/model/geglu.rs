//! One expert's GeGLU, `down( gelu(gate x) * (up x) )`, over the rows routed to it: the same
//! function whichever backend holds the expert's matrices.

use super::ops::{axpy, gelu_tanh, grow, project};
use crate::expert::Expert;
use crate::kernels::Matrix;

/// Buffers of one expert's evaluation.
#[derive(Default)]
pub struct ExpertScratch {
    xs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    ys: Vec<f32>,
}

/// Add expert `x`'s output, weighted by each member's gate, to the member rows of `out`
/// (`members`: (row of `xn`, gate) pairs).
pub fn expert_rows(x: &Expert, xn: &[f32], members: &[(usize, f32)], out: &mut [f32], s: &mut ExpertScratch) {
    let (w_gate, w_up, w_down) = (&x.gate, &x.up, &x.down);
    let d = w_gate.cols;
    let n = members.len();
    if n == 0 {
        return;
    }
    let f = w_gate.rows;
    let gate = grow(&mut s.gate, n * f);
    let up = grow(&mut s.up, n * f);
    if n == 1 {
        let t = members[0].0;
        // One pass over the pool for both projections, the input quantized once.
        Matrix::matvec_pair(w_gate, w_up, &xn[t * d..][..d], gate, up);
    } else {
        let xs = grow(&mut s.xs, n * d);
        for (i, &(t, _)) in members.iter().enumerate() {
            xs[i * d..][..d].copy_from_slice(&xn[t * d..][..d]);
        }
        project(w_gate, xs, n, gate);
        project(w_up, xs, n, up);
    }
    for (g, u) in gate.iter_mut().zip(up.iter()) {
        *g = gelu_tanh(*g) * u;
    }
    let ys = grow(&mut s.ys, n * d);
    project(w_down, gate, n, ys);
    for (i, &(t, g)) in members.iter().enumerate() {
        axpy(g, &ys[i * d..][..d], &mut out[t * d..][..d]);
    }
}
