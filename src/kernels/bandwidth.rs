//! Memory read bandwidth, STREAM style: threads read disjoint contiguous parts of a buffer far
//! larger than the last-level cache; the best of a few passes counts. This is the roofline a
//! memory-bound matrix-vector product is measured against.

use super::buf::AlignedBuf;
use std::sync::Barrier;
use std::time::Instant;

const PASSES: usize = 5;
const MIN_BYTES: usize = 256 << 20;

/// Bytes per second that `threads` threads read from memory.
pub fn measure_read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let len = (8 * last_level_cache_bytes().unwrap_or(0)).max(MIN_BYTES) / (64 * threads) * (64 * threads);
    let mut buf = AlignedBuf::zeroed(len);
    // Distinct contents in every page: page faults are not timed, and no page can be merged
    // with another (or stay the shared zero page) by the OS or a hypervisor.
    for (i, w) in buf.as_mut_slice().chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    let part = len / threads;
    let data = buf.as_slice();
    let start_line = Barrier::new(threads + 1);
    let end_line = Barrier::new(threads + 1);
    let mut best = f64::INFINITY;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let chunk = &data[t * part..(t + 1) * part];
            let (start_line, end_line) = (&start_line, &end_line);
            scope.spawn(move || {
                let mut sink = 0u64;
                for _ in 0..PASSES {
                    start_line.wait();
                    sink = sink.wrapping_add(read_all(chunk));
                    end_line.wait();
                }
                std::hint::black_box(sink);
            });
        }
        for _ in 0..PASSES {
            // Timed from before the start: a timer started after it could miss the pass if this
            // thread were descheduled.
            let t0 = Instant::now();
            start_line.wait();
            end_line.wait();
            best = best.min(t0.elapsed().as_secs_f64());
        }
    });
    len as f64 / best
}

/// Size of the largest cache the OS reports for cpu0, if it says.
fn last_level_cache_bytes() -> Option<usize> {
    let mut best = None;
    for index in 0..8 {
        let path = format!("/sys/devices/system/cpu/cpu0/cache/index{index}/size");
        let Ok(s) = std::fs::read_to_string(path) else { break };
        let s = s.trim();
        let (num, mult) = match s.as_bytes().last() {
            Some(b'K') => (&s[..s.len() - 1], 1 << 10),
            Some(b'M') => (&s[..s.len() - 1], 1 << 20),
            Some(b'G') => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        if let Ok(n) = num.parse::<usize>() {
            best = best.max(Some(n * mult));
        }
    }
    best
}

fn read_all(chunk: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return unsafe { read_all_avx2(chunk) };
    }
    read_all_generic(chunk)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_all_avx2(chunk: &[u8]) -> u64 {
    read_all_generic(chunk)
}

/// Eight independent lanes of 64-bit xors: every byte is loaded, and nothing but loads limits it.
#[inline(always)]
fn read_all_generic(chunk: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    for line in chunk.chunks_exact(64) {
        for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
            *a ^= u64::from_le_bytes(w.try_into().unwrap());
        }
    }
    acc.iter().fold(0, |x, y| x ^ y)
}
