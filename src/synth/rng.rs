//! Small, fast, seedable generators. Every block of every tensor gets its own stream, derived from
//! (seed, tensor name, block index) alone, so blocks can be generated in any order, on any number
//! of threads, and still give the same bytes.

/// One step of SplitMix64: a bijective mixer of 64-bit words, used to derive seeds.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mix64(*state)
}

/// The SplitMix64 finaliser on its own: a good avalanche of one word.
#[inline]
pub fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit key for a tensor name (FNV-1a, then mixed), stable across runs and platforms.
pub fn name_key(name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h)
}

/// xoshiro256++ (Blackman and Vigna): 256 bits of state, passes BigCrush, about a nanosecond a
/// word.
#[derive(Clone, Debug)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    /// Seed from one word through SplitMix64, as the generator's authors recommend; the state can
    /// never be all zeros this way.
    pub fn from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let s =
            [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Xoshiro256pp { s }
    }

    /// The stream for one block of one tensor.
    pub fn for_block(seed: u64, tensor_key: u64, block: u64) -> Self {
        let mut k = mix64(seed ^ 0x5EED_5EED_5EED_5EED);
        k = mix64(k ^ tensor_key);
        k = mix64(k ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Self::from_u64(k)
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_published_sequence() {
        // SplitMix64 seeded with 1234567, as listed in Rosetta Code's "Splitmix64" task.
        let mut s = 1234567u64;
        let got: Vec<u64> = (0..3).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn xoshiro_matches_reference_from_known_state() {
        // State [1, 2, 3, 4]: the first two outputs follow by hand from the definition
        // (rotl(5, 23) + 1, ...); all four agree with an independent transcription.
        let mut r = Xoshiro256pp { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [41943041, 58720359, 3588806011781223, 3591011842654386]);
    }

    #[test]
    fn streams_differ_by_seed_name_and_block() {
        let a = Xoshiro256pp::for_block(1, name_key("blk.0.attn_q"), 0).next_u64();
        let b = Xoshiro256pp::for_block(2, name_key("blk.0.attn_q"), 0).next_u64();
        let c = Xoshiro256pp::for_block(1, name_key("blk.0.attn_k"), 0).next_u64();
        let d = Xoshiro256pp::for_block(1, name_key("blk.0.attn_q"), 1).next_u64();
        let again = Xoshiro256pp::for_block(1, name_key("blk.0.attn_q"), 0).next_u64();
        assert_eq!(a, again);
        assert!(a != b && a != c && a != d && b != c && c != d);
    }

    #[test]
    fn low_sixteen_bits_are_uniform() {
        // The tables are indexed by 16-bit slices of each word; a chi-square over 256 buckets of
        // each slice catches a broken generator or a bad slicing.
        let mut r = Xoshiro256pp::from_u64(7);
        let n = 1 << 18;
        for shift in [0, 16, 32, 48] {
            let mut counts = [0u32; 256];
            let mut r2 = r.clone();
            for _ in 0..n {
                counts[((r2.next_u64() >> shift) & 0xff) as usize] += 1;
            }
            let e = n as f64 / 256.0;
            let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
            // 255 degrees of freedom: mean 255, sd ~22.6; 400 is beyond 6 sd.
            assert!(chi2 < 400.0, "shift {shift}: chi2 {chi2}");
            r.next_u64();
        }
    }
}
