//! Named model shapes and the scales their random weights are drawn with.
//!
//! | preset | vocab  | d_model | layers | experts | q/kv heads | head_dim | ffn  | bf16 bytes (no lm_head) |
//! |--------|--------|---------|--------|---------|------------|----------|------|-------------------------|
//! | micro  | 256    | 64      | 2      | 8 top-2 | 4 / 2      | 16       | 128  | 0.87 MB                 |
//! | tiny   | 1024   | 256     | 4      | 8 top-2 | 8 / 2      | 32       | 1024 | 52.2 MB                 |
//! | small  | 8192   | 512     | 6      | 8 top-2 | 8 / 2      | 64       | 1536 | 242.8 MB                |
//! | bench  | 131072 | 2048    | 8      | 8 top-2 | 16 / 4     | 128      | 8192 | 7.147 GB                |
//! | large  | 131072 | 2048    | 20     | 8 top-2 | 16 / 4     | 128      | 8192 | 17.06 GB                |
//! | grok-layers | 32768 | 6144 | 2     | 8 top-2 | 48 / 8     | 128      | 32768 | 20.08 GB               |
//!
//! `grok-layers` has Grok-1's layer shapes (two of its 64 layers, a smaller vocabulary): decode
//! speed on it is what one of Grok-1's layers costs, on a model that fits a GPU check's disk.
//!
//! Multipliers follow the fixtures: embedding sqrt(d_model), attention 1/sqrt(head_dim), output
//! 1/sqrt(3); eps 1e-5, RoPE base 1e4, attention soft-cap 30.

use super::dist::{Init, Shape};
use crate::checkpoint::{Proj, Tensor};
use crate::config::GrokConfig;

/// How the random weights are scaled. Every sub-block of a Grok layer is wrapped in RMS norms, so
/// the residual stream stays O(1) whatever the matrices' scale; these choices are about the
/// inside of each block: matrices ~ N(0, 1/fan_in) keep projections O(1), the q/k gain sets how
/// peaked attention is, and the router gain how decisive routing is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitScales {
    /// Standard deviation of the embedding (also the tied output head).
    pub embed_std: f64,
    /// Norm scales are `1 + norm_std * N(0, 1)`.
    pub norm_std: f64,
    /// Multiplies the q and k standard deviations: attention logits have std about `qk_gain^2`.
    pub qk_gain: f64,
    /// Router logits have std about `router_gain`.
    pub router_gain: f64,
    /// Share of matrix weights drawn from the wide component.
    pub outlier_fraction: f64,
    /// Width of the wide component relative to the narrow one.
    pub outlier_scale: f64,
    /// Skewed routing, 0 for none: router row `e` of layer `l` is scaled by
    /// `exp(-routing_skew * r / (n_experts - 1))`, `r = (e + l) % n_experts`, so the expert
    /// with `r = 0` has the widest logits and wins the top-k most often, as a few experts do in
    /// trained models. Off, the checkpoint is byte for byte what it was without the option.
    pub routing_skew: f64,
}

impl InitScales {
    /// The scales every preset uses, measured with a plain f32 forward pass (tests/synth.rs):
    /// - `embed_std = 0.32 / sqrt(d_model)` (0.02 at d_model 256, as in the fixtures). The
    ///   embedding enters the residual times sqrt(d_model) and leaves through the tied head, so
    ///   a fixed 0.02 at d_model 2048 makes the model echo its input token at every position
    ///   (measured: 100%); scaled this way about a quarter of positions do.
    /// - `qk_gain = 2`: attention logits with std ~4, entropy about a third of uniform. With
    ///   gain 1 attention is nearly uniform, every position sees the same average, and routing
    ///   collapses onto a few experts (one expert at 0.2% of selections in a layer).
    /// - `router_gain = 1.5`: top-1 router probability ~0.48; over 256 tokens every expert gets
    ///   2-30% of a layer's selections (1/8 would be perfectly even).
    /// - one weight in 1024 from a component 6 times wider: kurtosis ~6, largest weights ~14
    ///   sigma.
    pub fn for_d_model(d_model: usize) -> Self {
        InitScales {
            embed_std: 0.32 / (d_model as f64).sqrt(),
            norm_std: 0.1,
            qk_gain: 2.0,
            router_gain: 1.5,
            outlier_fraction: 1.0 / 1024.0,
            outlier_scale: 6.0,
            routing_skew: 0.0,
        }
    }
}

/// A named model shape with its generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub config: GrokConfig,
    pub init: InitScales,
}

#[allow(clippy::too_many_arguments)]
fn shape(
    vocab: usize,
    d_model: usize,
    n_layers: usize,
    n_experts: usize,
    top_k: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    ffn_size: usize,
) -> GrokConfig {
    GrokConfig {
        vocab_size: vocab,
        d_model,
        ffn_size,
        n_layers,
        n_q_heads,
        n_kv_heads,
        head_dim,
        n_experts,
        n_experts_per_token: top_k,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        attn_output_multiplier: 1.0 / (head_dim as f64).sqrt(),
        embedding_multiplier: (d_model as f64).sqrt(),
        output_multiplier: 1.0 / 3f64.sqrt(),
        attn_logit_cap: 30.0,
        max_seq_len: 8192,
        pad_token_id: 0,
        bos_token_id: 1,
        eos_token_id: 2,
    }
}

impl Preset {
    pub const NAMES: [&'static str; 6] = ["micro", "tiny", "small", "bench", "large", "grok-layers"];

    pub fn by_name(name: &str) -> Option<Preset> {
        let (about, config) = match name {
            "micro" => (
                "the shapes of the micro test fixture; under 1 MB",
                shape(256, 64, 2, 8, 2, 4, 2, 16, 128),
            ),
            "tiny" => (
                "demo model: converts and runs in seconds; 52 MB",
                shape(1024, 256, 4, 8, 2, 8, 2, 32, 1024),
            ),
            "small" => ("a few hundred MB, vocab 8192", shape(8192, 512, 6, 8, 2, 8, 2, 64, 1536)),
            "bench" => (
                "the runner's benchmark shape; 3.57 B parameters, 7.15 GB",
                shape(131072, 2048, 8, 8, 2, 16, 4, 128, 8192),
            ),
            "large" => (
                "bench proportions with 20 layers; 17.1 GB, for memory-budget tests",
                shape(131072, 2048, 20, 8, 2, 16, 4, 128, 8192),
            ),
            "grok-layers" => (
                "two layers of Grok-1's shapes, vocab 32768; 10.0 B parameters, 20.1 GB",
                shape(32768, 6144, 2, 8, 2, 48, 8, 128, 32768),
            ),
            _ => return None,
        };
        let init = InitScales::for_d_model(config.d_model);
        Some(Preset { name: Self::NAMES.into_iter().find(|n| *n == name)?, about, config, init })
    }

    pub fn all() -> Vec<Preset> {
        Self::NAMES.iter().filter_map(|n| Preset::by_name(n)).collect()
    }

    /// Unique parameters (the tied output head counted once).
    pub fn params(&self) -> u64 {
        Tensor::all(&self.config)
            .iter()
            .map(|t| t.shape(&self.config).iter().product::<usize>() as u64)
            .sum()
    }

    /// Gains of router `layer`'s rows (one per expert) under `routing_skew`; `None` when off.
    pub fn router_row_gains(&self, layer: usize) -> Option<Vec<f32>> {
        let n = self.config.n_experts;
        if self.init.routing_skew == 0.0 || n < 2 {
            return None;
        }
        let gain = |e: usize| (-self.init.routing_skew * ((e + layer) % n) as f64 / (n - 1) as f64).exp() as f32;
        Some((0..n).map(gain).collect())
    }

    /// The distribution tensor `t` is drawn from.
    pub fn init_of(&self, t: Tensor) -> Init {
        use Tensor::*;
        let c = &self.config;
        let s = &self.init;
        let heavy = Shape::Mixture { fraction: s.outlier_fraction, scale: s.outlier_scale };
        let fan_in = |n: usize| 1.0 / (n as f64).sqrt();
        let (shape, mean, std) = match t {
            Embedding => (heavy, 0.0, s.embed_std),
            OutputNorm | AttnNorm(_) | AttnOutNorm(_) | FfnNorm(_) | FfnOutNorm(_) => {
                (Shape::Normal, 1.0, s.norm_std)
            }
            AttnQ(_) | AttnK(_) => (heavy, 0.0, s.qk_gain * fan_in(c.d_model)),
            AttnV(_) => (heavy, 0.0, fan_in(c.d_model)),
            AttnO(_) => (heavy, 0.0, fan_in(c.q_dim())),
            // Outliers in the router would favour some experts for every token; keep it Gaussian.
            Router(_) => (Shape::Normal, 0.0, s.router_gain * fan_in(c.d_model)),
            Expert { proj: Proj::Down, .. } => (heavy, 0.0, fan_in(c.ffn_size)),
            Expert { .. } => (heavy, 0.0, fan_in(c.d_model)),
        };
        Init { shape, mean, std }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_sized_as_documented() {
        let all = Preset::all();
        assert_eq!(all.len(), Preset::NAMES.len());
        for p in &all {
            p.config.validate().unwrap();
            assert_eq!(Preset::by_name(p.name).as_ref(), Some(p));
            // Quantizers work in blocks of 32 along every row.
            for t in Tensor::all(&p.config) {
                let cols = *t.shape(&p.config).last().unwrap();
                assert_eq!(cols % 32, 0, "{}: {t} has {cols} columns", p.name);
            }
        }
        assert!(Preset::by_name("huge").is_none());
        let bench = Preset::by_name("bench").unwrap();
        // 8 layers x (attention 10,485,760 + router 16,384 + norms 8,192 + experts 402,653,184)
        // + embedding 268,435,456 + final norm 2,048.
        assert_eq!(bench.params(), 3_573_745_664);
        assert_eq!(
            bench.params() + 131072 * 2048,
            3_842_181_120,
            "with the tied head counted twice"
        );
        assert_eq!(Preset::by_name("tiny").unwrap().params(), 26_095_872);
        assert_eq!(Preset::by_name("small").unwrap().params(), 121_410_048);
        assert_eq!(Preset::by_name("large").unwrap().params(), 8_531_707_904);
        assert_eq!(Preset::by_name("micro").unwrap().params(), 435_776);
        // 2 layers x (attention 2 x 6144 x 6144 + 2 x 6144 x 1024 = 88,080,384, router 49,152,
        // norms 24,576, experts 8 x 3 x 6144 x 32768 = 4,831,838,208) + embedding 201,326,592
        // + final norm 6,144.
        assert_eq!(Preset::by_name("grok-layers").unwrap().params(), 10_041_317_376);
    }

    #[test]
    fn multipliers_follow_the_fixture_convention() {
        let micro = Preset::by_name("micro").unwrap().config;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/micro/hf/config.json");
        let fixture = GrokConfig::from_hf_json(std::path::Path::new(path)).unwrap();
        assert_eq!(micro.embedding_multiplier, fixture.embedding_multiplier);
        assert_eq!(micro.attn_output_multiplier, fixture.attn_output_multiplier);
        assert!((micro.output_multiplier - fixture.output_multiplier).abs() < 1e-15);
        assert_eq!(micro, GrokConfig { output_multiplier: micro.output_multiplier, ..fixture });
    }
}
