//! Model hyper-parameters. Read from a checkpoint's `config.json` (both published namings), stored
//! in the converted model's manifest, and read back by the runner. Defaults are Grok-1's own
//! values (xai-org/grok-1 run.py), so a checkpoint without a config still describes Grok-1.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrokConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub ffn_size: usize,
    pub n_layers: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_experts: usize,
    pub n_experts_per_token: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attn_output_multiplier: f64,
    pub embedding_multiplier: f64,
    pub output_multiplier: f64,
    /// Attention logits are soft-capped to `cap * tanh(x / cap)`.
    pub attn_logit_cap: f64,
    pub max_seq_len: usize,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl Default for GrokConfig {
    fn default() -> Self {
        GrokConfig {
            vocab_size: 131072,
            d_model: 6144,
            ffn_size: 32768,
            n_layers: 64,
            n_q_heads: 48,
            n_kv_heads: 8,
            head_dim: 128,
            n_experts: 8,
            n_experts_per_token: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            attn_output_multiplier: 0.08838834764831845,
            embedding_multiplier: 78.38367176906169,
            output_multiplier: 0.5773502691896257,
            attn_logit_cap: 30.0,
            max_seq_len: 8192,
            pad_token_id: 0,
            bos_token_id: 1,
            eos_token_id: 2,
        }
    }
}

impl GrokConfig {
    /// Parse a Hugging Face `config.json` (keyfan `GrokForCausalLM` or hpcai
    /// `Grok1ModelForCausalLM`). Missing keys take Grok-1's values.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_value(&v).map_err(|msg| Error::bad_file(path, msg))
    }

    pub fn from_hf_value(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("config is not a JSON object")?;
        if let Some(arch) = obj.get("architectures").and_then(|a| a.as_array()) {
            let known = ["GrokForCausalLM", "Grok1ModelForCausalLM", "Grok1ForCausalLM"];
            let names: Vec<&str> = arch.iter().filter_map(|a| a.as_str()).collect();
            if !names.is_empty() && !names.iter().any(|n| known.contains(n)) {
                return Err(format!(
                    "unknown architecture {names:?}: expected one of {known:?}"
                ));
            }
        }
        let d = GrokConfig::default();
        let int = |keys: &[&str], default: usize| -> std::result::Result<usize, String> {
            for k in keys {
                if let Some(x) = obj.get(*k) {
                    return x
                        .as_u64()
                        .filter(|&n| n > 0)
                        .map(|n| n as usize)
                        .ok_or_else(|| format!("`{k}` must be a positive integer, found {x}"));
                }
            }
            Ok(default)
        };
        let float = |keys: &[&str], default: f64| -> std::result::Result<f64, String> {
            for k in keys {
                if let Some(x) = obj.get(*k) {
                    return x
                        .as_f64()
                        .filter(|f| f.is_finite())
                        .ok_or_else(|| format!("`{k}` must be a finite number, found {x}"));
                }
            }
            Ok(default)
        };
        let d_model = int(&["hidden_size", "d_model"], d.d_model)?;
        let n_q_heads = int(&["num_attention_heads"], d.n_q_heads)?;
        let c = GrokConfig {
            vocab_size: int(&["vocab_size"], d.vocab_size)?,
            d_model,
            ffn_size: int(&["intermediate_size"], d.ffn_size)?,
            n_layers: int(&["num_hidden_layers"], d.n_layers)?,
            n_q_heads,
            n_kv_heads: int(&["num_key_value_heads"], d.n_kv_heads)?,
            head_dim: int(&["head_dim"], d_model / n_q_heads)?,
            n_experts: int(&["num_local_experts", "num_experts"], d.n_experts)?,
            n_experts_per_token: int(&["num_experts_per_tok"], d.n_experts_per_token)?,
            rms_norm_eps: float(&["rms_norm_eps"], d.rms_norm_eps)?,
            rope_theta: float(&["rope_theta"], d.rope_theta)?,
            attn_output_multiplier: float(&["attn_output_multiplier"], d.attn_output_multiplier)?,
            embedding_multiplier: float(
                &["embedding_multiplier_scale"],
                d.embedding_multiplier,
            )?,
            output_multiplier: float(&["output_multiplier_scale"], d.output_multiplier)?,
            attn_logit_cap: float(&["max_attn_value", "attn_logit_softcapping"], d.attn_logit_cap)?,
            max_seq_len: int(&["max_position_embeddings"], d.max_seq_len)?,
            pad_token_id: int(&["pad_token_id"], 0).or_else(|_| Ok::<_, String>(0))? as u32,
            bos_token_id: int(&["bos_token_id"], 1)? as u32,
            eos_token_id: int(&["eos_token_id"], 2)? as u32,
        };
        c.validate()?;
        Ok(c)
    }

    /// Structural checks every consumer relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_q_heads % self.n_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.n_q_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if self.n_experts_per_token > self.n_experts {
            return Err(format!(
                "num_experts_per_tok {} exceeds the number of experts {}",
                self.n_experts_per_token, self.n_experts
            ));
        }
        if self.n_experts_per_token == 0 {
            return Err("num_experts_per_tok must be at least 1".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_q_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Parameter count of one expert (gate, up and down projections).
    pub fn expert_params(&self) -> usize {
        3 * self.d_model * self.ffn_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_grok1() {
        let c = GrokConfig::from_hf_value(&serde_json::json!({})).unwrap();
        assert_eq!(c, GrokConfig::default());
        assert_eq!(c.ffn_size, 32768);
        assert_eq!(c.head_dim, 128);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_values() {
        let e = GrokConfig::from_hf_value(&serde_json::json!({"architectures": ["LlamaForCausalLM"]}))
            .unwrap_err();
        assert!(e.contains("unknown architecture"), "{e}");
        let e = GrokConfig::from_hf_value(&serde_json::json!({"hidden_size": "big"})).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        let e = GrokConfig::from_hf_value(
            &serde_json::json!({"num_attention_heads": 6, "num_key_value_heads": 4}),
        )
        .unwrap_err();
        assert!(e.contains("multiple"), "{e}");
    }
}
