//! One canonical name per tensor. The published namings (keyfan, hpcai) are translated here and
//! nowhere else. Canonical matrices are `[out, in]` (rows are output channels).

use crate::config::GrokConfig;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// `linear` in the release: the GELU ("gate") branch, `[ffn, d_model]`.
    Gate,
    /// `linear_v`: the linear ("up"/value) branch, `[ffn, d_model]`.
    Up,
    /// `linear_1`: the down projection, `[d_model, ffn]`.
    Down,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];
    pub fn name(self) -> &'static str {
        match self {
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tensor {
    Embedding,
    OutputNorm,
    AttnNorm(usize),
    AttnQ(usize),
    AttnK(usize),
    AttnV(usize),
    AttnO(usize),
    AttnOutNorm(usize),
    FfnNorm(usize),
    Router(usize),
    FfnOutNorm(usize),
    Expert { layer: usize, expert: usize, proj: Proj },
}

/// Which published naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// keyfan/grok-1-hf: `transformer.decoder_layer.{L}.moe.{e}.linear.weight`
    Keyfan,
    /// hpcai-tech/grok-1: `model.layers.{L}.moe_block.experts.{e}.linear.weight`
    Hpcai,
}

/// What a source name means: a tensor, the tied output head (skipped), or nothing we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Tensor(Tensor),
    TiedHead,
    Unknown,
}

impl Tensor {
    pub fn is_expert(&self) -> bool {
        matches!(self, Tensor::Expert { .. })
    }

    pub fn layer(&self) -> Option<usize> {
        use Tensor::*;
        match *self {
            Embedding | OutputNorm => None,
            AttnNorm(l) | AttnQ(l) | AttnK(l) | AttnV(l) | AttnO(l) | AttnOutNorm(l)
            | FfnNorm(l) | Router(l) | FfnOutNorm(l) => Some(l),
            Expert { layer, .. } => Some(layer),
        }
    }

    /// Vectors (norm scales) are kept in f32; the router too, since routing flips on tiny
    /// differences.
    pub fn keeps_f32(&self) -> bool {
        use Tensor::*;
        matches!(self, OutputNorm | AttnNorm(_) | AttnOutNorm(_) | FfnNorm(_) | FfnOutNorm(_) | Router(_))
    }

    /// Canonical shape, `[out, in]` for matrices.
    pub fn shape(&self, c: &GrokConfig) -> Vec<usize> {
        use Tensor::*;
        match *self {
            Embedding => vec![c.vocab_size, c.d_model],
            OutputNorm | AttnNorm(_) | AttnOutNorm(_) | FfnNorm(_) | FfnOutNorm(_) => {
                vec![c.d_model]
            }
            AttnQ(_) => vec![c.q_dim(), c.d_model],
            AttnK(_) | AttnV(_) => vec![c.kv_dim(), c.d_model],
            AttnO(_) => vec![c.d_model, c.q_dim()],
            Router(_) => vec![c.n_experts, c.d_model],
            Expert { proj: Proj::Down, .. } => vec![c.d_model, c.ffn_size],
            Expert { .. } => vec![c.ffn_size, c.d_model],
        }
    }

    /// Every tensor of a model, in the order the converter writes them: dense tensors first (by
    /// layer), then expert chunks by (layer, expert), gate, up, down inside each.
    pub fn all(c: &GrokConfig) -> Vec<Tensor> {
        let mut v = Self::dense(c);
        for layer in 0..c.n_layers {
            for expert in 0..c.n_experts {
                for proj in Proj::ALL {
                    v.push(Tensor::Expert { layer, expert, proj });
                }
            }
        }
        v
    }

    pub fn dense(c: &GrokConfig) -> Vec<Tensor> {
        use Tensor::*;
        let mut v = vec![Embedding, OutputNorm];
        for l in 0..c.n_layers {
            v.extend([AttnNorm(l), AttnQ(l), AttnK(l), AttnV(l), AttnO(l), AttnOutNorm(l)]);
            v.extend([FfnNorm(l), Router(l), FfnOutNorm(l)]);
        }
        v
    }

    /// Parse a canonical name (as written by `Display`).
    pub fn parse_canonical(s: &str) -> Option<Tensor> {
        use Tensor::*;
        match s {
            "token_embd" => return Some(Embedding),
            "output_norm" => return Some(OutputNorm),
            _ => {}
        }
        let rest = s.strip_prefix("blk.")?;
        let (l, rest) = rest.split_once('.')?;
        let l: usize = l.parse().ok()?;
        Some(match rest {
            "attn_norm" => AttnNorm(l),
            "attn_q" => AttnQ(l),
            "attn_k" => AttnK(l),
            "attn_v" => AttnV(l),
            "attn_o" => AttnO(l),
            "attn_out_norm" => AttnOutNorm(l),
            "ffn_norm" => FfnNorm(l),
            "ffn_router" => Router(l),
            "ffn_out_norm" => FfnOutNorm(l),
            _ => {
                let rest = rest.strip_prefix("expert.")?;
                let (e, p) = rest.split_once('.')?;
                let proj = match p {
                    "gate" => Proj::Gate,
                    "up" => Proj::Up,
                    "down" => Proj::Down,
                    _ => return None,
                };
                Expert { layer: l, expert: e.parse().ok()?, proj }
            }
        })
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Tensor::*;
        match *self {
            Embedding => write!(f, "token_embd"),
            OutputNorm => write!(f, "output_norm"),
            AttnNorm(l) => write!(f, "blk.{l}.attn_norm"),
            AttnQ(l) => write!(f, "blk.{l}.attn_q"),
            AttnK(l) => write!(f, "blk.{l}.attn_k"),
            AttnV(l) => write!(f, "blk.{l}.attn_v"),
            AttnO(l) => write!(f, "blk.{l}.attn_o"),
            AttnOutNorm(l) => write!(f, "blk.{l}.attn_out_norm"),
            FfnNorm(l) => write!(f, "blk.{l}.ffn_norm"),
            Router(l) => write!(f, "blk.{l}.ffn_router"),
            FfnOutNorm(l) => write!(f, "blk.{l}.ffn_out_norm"),
            Expert { layer, expert, proj } => {
                write!(f, "blk.{layer}.expert.{expert}.{}", proj.name())
            }
        }
    }
}

fn split_layer(s: &str) -> Option<(usize, &str)> {
    let (l, rest) = s.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// Translate a Hugging Face tensor name in either naming.
pub fn parse_hf(name: &str) -> (Option<Naming>, Parsed) {
    use Tensor::*;
    if name == "lm_head.weight" {
        return (None, Parsed::TiedHead);
    }
    if let Some(rest) = name.strip_prefix("transformer.") {
        let t = match rest {
            "in_out_embed.weight" => Some(Embedding),
            "rms_norm.weight" => Some(OutputNorm),
            _ => rest.strip_prefix("decoder_layer.").and_then(split_layer).and_then(|(l, r)| {
                Some(match r {
                    "rms_norm.weight" => AttnNorm(l),
                    "rms_norm_1.weight" => AttnOutNorm(l),
                    "rms_norm_2.weight" => FfnNorm(l),
                    "rms_norm_3.weight" => FfnOutNorm(l),
                    "multi_head_attention.query.weight" => AttnQ(l),
                    "multi_head_attention.key.weight" => AttnK(l),
                    "multi_head_attention.value.weight" => AttnV(l),
                    "multi_head_attention.linear.weight" => AttnO(l),
                    "router.weight" => Router(l),
                    _ => {
                        let (e, p) = r.strip_prefix("moe.").and_then(split_layer)?;
                        expert(l, e, p.strip_suffix(".weight")?)?
                    }
                })
            }),
        };
        return (Some(Naming::Keyfan), t.map_or(Parsed::Unknown, Parsed::Tensor));
    }
    if let Some(rest) = name.strip_prefix("model.") {
        let t = match rest {
            "embed_tokens.weight" => Some(Embedding),
            "norm.scale" | "norm.weight" => Some(OutputNorm),
            _ => rest.strip_prefix("layers.").and_then(split_layer).and_then(|(l, r)| {
                Some(match r {
                    "pre_attn_norm.scale" => AttnNorm(l),
                    "post_attn_norm.scale" => AttnOutNorm(l),
                    "pre_moe_norm.scale" => FfnNorm(l),
                    "post_moe_norm.scale" => FfnOutNorm(l),
                    "attn.q_proj.weight" => AttnQ(l),
                    "attn.k_proj.weight" => AttnK(l),
                    "attn.v_proj.weight" => AttnV(l),
                    "attn.o_proj.weight" => AttnO(l),
                    "moe_block.gate.weight" => Router(l),
                    _ => {
                        let (e, p) =
                            r.strip_prefix("moe_block.experts.").and_then(split_layer)?;
                        expert(l, e, p.strip_suffix(".weight")?)?
                    }
                })
            }),
        };
        return (Some(Naming::Hpcai), t.map_or(Parsed::Unknown, Parsed::Tensor));
    }
    (None, Parsed::Unknown)
}

fn expert(layer: usize, expert: usize, proj: &str) -> Option<Tensor> {
    let proj = match proj {
        "linear" => Proj::Gate,
        "linear_v" => Proj::Up,
        "linear_1" => Proj::Down,
        _ => return None,
    };
    Some(Tensor::Expert { layer, expert, proj })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_namings_map_to_the_same_tensors() {
        let pairs = [
            ("transformer.decoder_layer.3.moe.5.linear_v.weight", "model.layers.3.moe_block.experts.5.linear_v.weight"),
            ("transformer.decoder_layer.0.rms_norm_2.weight", "model.layers.0.pre_moe_norm.scale"),
            ("transformer.decoder_layer.7.multi_head_attention.linear.weight", "model.layers.7.attn.o_proj.weight"),
            ("transformer.decoder_layer.1.router.weight", "model.layers.1.moe_block.gate.weight"),
            ("transformer.in_out_embed.weight", "model.embed_tokens.weight"),
            ("transformer.rms_norm.weight", "model.norm.scale"),
        ];
        for (k, h) in pairs {
            let (nk, pk) = parse_hf(k);
            let (nh, ph) = parse_hf(h);
            assert_eq!(nk, Some(Naming::Keyfan));
            assert_eq!(nh, Some(Naming::Hpcai));
            assert_eq!(pk, ph, "{k} vs {h}");
            let Parsed::Tensor(t) = pk else { panic!("{k} not parsed") };
            assert_eq!(Tensor::parse_canonical(&t.to_string()), Some(t));
        }
        assert_eq!(parse_hf("lm_head.weight").1, Parsed::TiedHead);
        assert_eq!(parse_hf("transformer.decoder_layer.0.moe.0.linear_2.weight").1, Parsed::Unknown);
    }

    #[test]
    fn canonical_names_round_trip() {
        let c = GrokConfig { n_layers: 3, ..GrokConfig::default() };
        for t in Tensor::all(&c) {
            assert_eq!(Tensor::parse_canonical(&t.to_string()), Some(t));
        }
    }
}
