//! What goes where: Hugging Face tensor names in either naming, the order tensors are stored in,
//! their split into shards, and every byte offset, all fixed before any data is generated so each
//! file can be written front to back in one pass.

use super::{Preset, SynthDtype, SynthOptions};
use crate::checkpoint::{Naming, Proj, Tensor};
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use serde_json::{json, Value};

/// The tied output head. Readers skip it; it holds the embedding's values.
pub const LM_HEAD: &str = "lm_head.weight";

/// The name tensor `t` has in a checkpoint of the given naming (the inverse of
/// `checkpoint::names::parse_hf`).
pub fn hf_name(t: Tensor, naming: Naming) -> String {
    use Tensor::*;
    match naming {
        Naming::Keyfan => {
            let layer = |l: usize, rest: &str| format!("transformer.decoder_layer.{l}.{rest}");
            match t {
                Embedding => "transformer.in_out_embed.weight".into(),
                OutputNorm => "transformer.rms_norm.weight".into(),
                AttnNorm(l) => layer(l, "rms_norm.weight"),
                AttnOutNorm(l) => layer(l, "rms_norm_1.weight"),
                FfnNorm(l) => layer(l, "rms_norm_2.weight"),
                FfnOutNorm(l) => layer(l, "rms_norm_3.weight"),
                AttnQ(l) => layer(l, "multi_head_attention.query.weight"),
                AttnK(l) => layer(l, "multi_head_attention.key.weight"),
                AttnV(l) => layer(l, "multi_head_attention.value.weight"),
                AttnO(l) => layer(l, "multi_head_attention.linear.weight"),
                Router(l) => layer(l, "router.weight"),
                Expert { layer: l, expert, proj } => {
                    layer(l, &format!("moe.{expert}.{}.weight", release_proj(proj)))
                }
            }
        }
        Naming::Hpcai => {
            let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
            match t {
                Embedding => "model.embed_tokens.weight".into(),
                OutputNorm => "model.norm.scale".into(),
                AttnNorm(l) => layer(l, "pre_attn_norm.scale"),
                AttnOutNorm(l) => layer(l, "post_attn_norm.scale"),
                FfnNorm(l) => layer(l, "pre_moe_norm.scale"),
                FfnOutNorm(l) => layer(l, "post_moe_norm.scale"),
                AttnQ(l) => layer(l, "attn.q_proj.weight"),
                AttnK(l) => layer(l, "attn.k_proj.weight"),
                AttnV(l) => layer(l, "attn.v_proj.weight"),
                AttnO(l) => layer(l, "attn.o_proj.weight"),
                Router(l) => layer(l, "moe_block.gate.weight"),
                Expert { layer: l, expert, proj } => {
                    layer(l, &format!("moe_block.experts.{expert}.{}.weight", release_proj(proj)))
                }
            }
        }
    }
}

fn release_proj(p: Proj) -> &'static str {
    match p {
        Proj::Gate => "linear",
        Proj::Up => "linear_v",
        Proj::Down => "linear_1",
    }
}

pub fn naming_name(n: Naming) -> &'static str {
    match n {
        Naming::Keyfan => "keyfan",
        Naming::Hpcai => "hpcai",
    }
}

/// One stored tensor.
#[derive(Debug, Clone)]
pub struct Item {
    pub hf_name: String,
    /// The canonical tensor whose values these are (the tied head stores the embedding's), which
    /// also keys the random streams: both namings hold the same weights for the same seed.
    pub source: Tensor,
    pub shape: Vec<usize>,
    /// Byte offset inside the file's data section.
    pub offset: u64,
    pub bytes: u64,
}

impl Item {
    pub fn rows(&self) -> usize {
        if self.shape.len() == 1 {
            1
        } else {
            self.shape[0]
        }
    }
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap()
    }
}

#[derive(Debug, Clone)]
pub struct FilePlan {
    pub name: String,
    pub items: Vec<Item>,
    /// The 8-byte length prefix and the JSON header, padded to a multiple of 8.
    pub header: Vec<u8>,
    pub data_bytes: u64,
}

/// Everything `write` will produce, known before it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) files: Vec<FilePlan>,
    pub(crate) config_json: String,
    pub(crate) index_json: Option<String>,
}

impl Plan {
    /// Bytes of tensor data over all files: the total `progress` counts up to.
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.data_bytes).sum()
    }
    /// Bytes of the safetensors files, headers included.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.header.len() as u64 + f.data_bytes).sum()
    }
    pub fn file_names(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }
    pub fn n_tensors(&self) -> usize {
        self.files.iter().map(|f| f.items.len()).sum()
    }
}

/// Storage order: embedding, then layer by layer (attention, norms, router, experts), then the
/// final norm and the optional tied head, the way published checkpoints group their shards.
fn storage_order(c: &GrokConfig) -> Vec<Tensor> {
    use Tensor::*;
    let mut v = vec![Embedding];
    for l in 0..c.n_layers {
        v.extend([AttnQ(l), AttnK(l), AttnV(l), AttnO(l)]);
        v.extend([AttnNorm(l), AttnOutNorm(l), FfnNorm(l), FfnOutNorm(l), Router(l)]);
        for expert in 0..c.n_experts {
            for proj in Proj::ALL {
                v.push(Expert { layer: l, expert, proj });
            }
        }
    }
    v.push(OutputNorm);
    v
}

pub fn plan(preset: &Preset, opts: &SynthOptions) -> Result<Plan> {
    let c = &preset.config;
    c.validate().map_err(|e| Error::Invalid(format!("preset {}: {e}", preset.name)))?;
    if opts.shard_bytes == 0 {
        return Err(Error::Invalid("shard size must be at least one byte".into()));
    }
    let esize = opts.dtype.bytes() as u64;
    let mut items: Vec<Item> =
        storage_order(c).into_iter().map(|t| item(hf_name(t, opts.naming), t, c, esize)).collect();
    if opts.write_lm_head {
        items.push(item(LM_HEAD.into(), Tensor::Embedding, c, esize));
    }
    let total: u64 = items.iter().map(|i| i.bytes).sum();

    // Greedy: a shard takes tensors in order until the next would overflow it. A tensor larger
    // than the limit gets a shard of its own; tensors are never split.
    let mut groups: Vec<Vec<Item>> = vec![];
    let mut cur: Vec<Item> = vec![];
    let mut cur_bytes = 0u64;
    for it in items {
        if !cur.is_empty() && cur_bytes + it.bytes > opts.shard_bytes {
            groups.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur_bytes += it.bytes;
        cur.push(it);
    }
    groups.push(cur);

    let n = groups.len();
    let mut files = Vec::with_capacity(n);
    for (i, mut items) in groups.into_iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let mut off = 0u64;
        for it in &mut items {
            it.offset = off;
            off += it.bytes;
        }
        let header = header_bytes(&items, opts.dtype);
        files.push(FilePlan { name, items, header, data_bytes: off });
    }
    let index_json = (n > 1).then(|| {
        let mut map = serde_json::Map::new();
        for f in &files {
            for it in &f.items {
                map.insert(it.hf_name.clone(), Value::String(f.name.clone()));
            }
        }
        let v = json!({ "metadata": { "total_size": total }, "weight_map": map });
        serde_json::to_string_pretty(&v).expect("JSON of strings and numbers")
    });
    Ok(Plan { files, config_json: config_json(c, opts.naming), index_json })
}

fn item(hf_name: String, t: Tensor, c: &GrokConfig, esize: u64) -> Item {
    let shape = t.shape(c);
    let bytes = shape.iter().product::<usize>() as u64 * esize;
    Item { hf_name, source: t, shape, offset: 0, bytes }
}

fn header_bytes(items: &[Item], dtype: SynthDtype) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    for it in items {
        map.insert(
            it.hf_name.clone(),
            json!({
                "dtype": dtype.safetensors_name(),
                "shape": it.shape,
                "data_offsets": [it.offset, it.offset + it.bytes],
            }),
        );
    }
    let mut text = serde_json::to_string(&Value::Object(map)).expect("JSON of strings and numbers");
    // Pad with spaces (valid JSON whitespace) so the data starts 8-byte aligned, as the reference
    // writer does; memory-mapped readers can then view f32 data in place.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// `config.json` with the keys, key order and architecture name of the published checkpoints
/// of each naming.
pub fn config_json(c: &GrokConfig, naming: Naming) -> String {
    let mut kv: Vec<(&str, Value)> = vec![
        ("vocab_size", json!(c.vocab_size)),
        ("hidden_size", json!(c.d_model)),
        ("intermediate_size", json!(c.ffn_size)),
        ("num_hidden_layers", json!(c.n_layers)),
        ("num_attention_heads", json!(c.n_q_heads)),
        ("num_key_value_heads", json!(c.n_kv_heads)),
        ("head_dim", json!(c.head_dim)),
        ("max_position_embeddings", json!(c.max_seq_len)),
        ("rms_norm_eps", json!(c.rms_norm_eps)),
        ("rope_theta", json!(c.rope_theta)),
        ("attn_output_multiplier", json!(c.attn_output_multiplier)),
        ("embedding_multiplier_scale", json!(c.embedding_multiplier)),
        ("output_multiplier_scale", json!(c.output_multiplier)),
        ("max_attn_value", json!(c.attn_logit_cap)),
        ("num_experts_per_tok", json!(c.n_experts_per_token)),
        ("pad_token_id", json!(c.pad_token_id)),
        ("bos_token_id", json!(c.bos_token_id)),
        ("eos_token_id", json!(c.eos_token_id)),
        ("tie_word_embeddings", json!(true)),
        ("torch_dtype", json!("bfloat16")),
        ("use_cache", json!(true)),
    ];
    match naming {
        Naming::Keyfan => kv.extend([
            ("architectures", json!(["GrokForCausalLM"])),
            ("model_type", json!("grok")),
            ("hidden_act", json!("gelu_new")),
            ("num_local_experts", json!(c.n_experts)),
            ("output_router_logits", json!(false)),
            ("router_aux_loss_coef", json!(0.02)),
            ("attention_dropout", json!(0.0)),
            ("initializer_range", json!(0.02)),
        ]),
        Naming::Hpcai => kv.extend([
            ("architectures", json!(["Grok1ModelForCausalLM"])),
            ("model_type", json!("grok-1")),
            ("num_experts", json!(c.n_experts)),
            ("output_router_logits", json!(false)),
            ("router_aux_loss_coef", json!(0.001)),
        ]),
    }
    // serde_json's map sorts keys; published configs keep this order, so write it by hand.
    let mut s = String::from("{\n");
    for (i, (k, v)) in kv.iter().enumerate() {
        let v = serde_json::to_string(v).expect("JSON value");
        let sep = if i + 1 < kv.len() { "," } else { "" };
        s.push_str(&format!("  {}: {v}{sep}\n", Value::String(k.to_string())));
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::names::{parse_hf, Parsed};

    #[test]
    fn names_parse_back_in_both_namings() {
        let c = Preset::by_name("micro").unwrap().config;
        for naming in [Naming::Keyfan, Naming::Hpcai] {
            for t in Tensor::all(&c) {
                let n = hf_name(t, naming);
                assert_eq!(parse_hf(&n), (Some(naming), Parsed::Tensor(t)), "{n}");
            }
        }
        assert_eq!(parse_hf(LM_HEAD).1, Parsed::TiedHead);
    }

    #[test]
    fn config_json_matches_the_fixture_key_for_key() {
        for (naming, dir) in [(Naming::Keyfan, "hf"), (Naming::Hpcai, "hf-hpcai")] {
            let path = format!("{}/tests/data/micro/{dir}/config.json", env!("CARGO_MANIFEST_DIR"));
            let fixture: Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let c = Preset::by_name("micro").unwrap().config;
            let ours: Value = serde_json::from_str(&config_json(&c, naming)).unwrap();
            let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&ours), keys(&fixture), "{dir}");
            for (k, v) in fixture.as_object().unwrap() {
                let o = &ours[k];
                match (v.as_f64(), o.as_f64()) {
                    (Some(a), Some(b)) => {
                        assert!((a - b).abs() <= 1e-15 * a.abs(), "{k}: {a} vs {b}")
                    }
                    _ => assert_eq!(o, v, "{k}"),
                }
            }
            assert_eq!(GrokConfig::from_hf_value(&ours).unwrap(), c);
        }
    }

    #[test]
    fn shards_respect_the_limit_and_offsets_are_contiguous() {
        let p = Preset::by_name("micro").unwrap();
        let opts = SynthOptions { shard_bytes: 100_000, write_lm_head: true, ..Default::default() };
        let plan = plan(&p, &opts).unwrap();
        assert!(plan.files.len() > 5);
        let mut seen = 0;
        for (i, f) in plan.files.iter().enumerate() {
            assert_eq!(
                f.name,
                format!("model-{:05}-of-{:05}.safetensors", i + 1, plan.files.len())
            );
            assert!(f.data_bytes <= opts.shard_bytes || f.items.len() == 1);
            assert_eq!(f.header.len() % 8, 0);
            let mut off = 0;
            for it in &f.items {
                assert_eq!(it.offset, off);
                off += it.bytes;
                seen += 1;
            }
            assert_eq!(off, f.data_bytes);
        }
        assert_eq!(seen, Tensor::all(&p.config).len() + 1);
        assert_eq!(plan.data_bytes(), 2 * (p.params() + 256 * 64));
        let one = super::plan(&p, &SynthOptions::default()).unwrap();
        assert_eq!(one.file_names(), ["model.safetensors"]);
        assert!(one.index_json.is_none() && plan.index_json.is_some());
    }
}
