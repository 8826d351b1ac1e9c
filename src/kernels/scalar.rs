//! The reference kernels: plain loops over the runtime layouts, one output at a time. Every SIMD
//! path is tested against these. The integer path performs the same float operations per row in
//! the same order as the SIMD paths (`acc = fma(isum, d_w * d_x, acc)` block after block), so
//! they agree bit for bit today; tests allow summation-order differences all the same.

use super::pack::TILE;
use super::{FloatJob, IntJob};
use std::ops::Range;

pub(crate) unsafe fn int_tiles(j: &IntJob, tiles: Range<usize>) {
    let t = j.t;
    let tb = t.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE {
            let r = ti * TILE + i;
            if r >= j.rows {
                break;
            }
            for tok in 0..j.acts.n {
                let mut acc = 0f32;
                for b in 0..t.nbp {
                    let q = &tile[t.quant_off(b)..t.quant_off(b) + t.qbytes()];
                    let x = j.acts.q(tok, b);
                    let mut isum = 0i32;
                    for (e, &xe) in x.iter().enumerate() {
                        isum += t.quant(q, i, e) as i32 * xe as i32;
                    }
                    let so = t.scale_off(b) + 2 * i;
                    let dw = half::f16::from_le_bytes([tile[so], tile[so + 1]]).to_f32();
                    acc = (isum as f32).mul_add(dw * j.acts.d(tok, b), acc);
                }
                *j.y.add(tok * j.ystride + r) = acc;
            }
        }
    }
}

pub(crate) unsafe fn float_tiles(j: &FloatJob, tiles: Range<usize>) {
    let tb = j.f.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE {
            let r = ti * TILE + i;
            if r >= j.rows {
                break;
            }
            for tok in 0..j.n {
                let x = &j.xs[tok * j.cols..(tok + 1) * j.cols];
                let mut s = 0f32;
                for (c, xv) in x.iter().enumerate() {
                    s += j.f.weight(tile, i, c) * xv;
                }
                *j.y.add(tok * j.ystride + r) = s;
            }
        }
    }
}
