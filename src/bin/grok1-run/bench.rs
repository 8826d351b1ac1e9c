//! `bench`: prefill and decode speed, weight bytes per token, and the fraction of this machine's
//! measured memory read bandwidth that decoding reaches.

use crate::load::load;
use crate::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use grok1::model::KvCache;
use grok1::sampling::argmax;
use serde::Serialize;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct BenchReport {
    threads: usize,
    kernels: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    weight_bytes_per_token: u64,
    decode_gb_s: f64,
    /// The mean of the two probes, taken right before prefill and right after decoding: on a
    /// shared machine the bandwidth on offer drifts (measured here: 33 to 65 GB/s between runs
    /// minutes apart), and one probe may catch a moment the decode did not see.
    read_bandwidth_gb_s: f64,
    read_bandwidth_before_gb_s: f64,
    read_bandwidth_after_gb_s: f64,
    roofline_fraction: f64,
    roofline_tok_s: f64,
    /// Expert residency statistics, when experts are streamed (`--ram-budget`).
    experts: Option<grok1::residency::StoreStats>,
    /// Where the run was placed (device, budget, what it holds), or why it is on the CPU.
    placement: String,
    /// Per decoded token, when a device is used: experts it computed, bytes and copies each
    /// way over the bus, device time.
    gpu: Option<grok1::gpu::stats::GpuReport>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be at least 1");
    }
    let loaded = load(&a.model, Some(a.prompt_tokens + a.gen_tokens + 1))?;
    let model = &loaded.model;
    let config = model.config().clone();
    let threads = grok1::kernels::threads();

    // A deterministic prompt of ordinary tokens (ids above the special ones; 0 is padding).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % (config.vocab_size as u64 - 3)) as u32
        })
        .collect();

    let before = grok1::kernels::measure_read_bandwidth(threads);

    let mut cache = KvCache::new(&config, a.prompt_tokens + a.gen_tokens + 1);
    let t0 = Instant::now();
    let logits = model.prefill(&prompt, &mut cache, false)?;
    let prefill_s = t0.elapsed().as_secs_f64();

    let mut next = argmax(&logits);
    let mut logits = vec![0f32; config.vocab_size];
    // One untimed step so first-touch costs do not count.
    model.decode_into(next, &mut cache, &mut logits)?;
    next = argmax(&logits);
    let gpu_before = model.gpu_stats();
    let t1 = Instant::now();
    for _ in 0..a.gen_tokens {
        model.decode_into(next, &mut cache, &mut logits)?;
        next = argmax(&logits);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let gpu = model.gpu_stats().zip(gpu_before).map(|(after, before)| (after - before).report());
    let after = grok1::kernels::measure_read_bandwidth(threads);
    let bandwidth = (before + after) / 2.0;

    let bytes = model.model().decode_weight_bytes() as u64;
    let decode_tok_s = a.gen_tokens as f64 / decode_s;
    let decode_gb_s = bytes as f64 * decode_tok_s / 1e9;
    let r = BenchReport {
        threads,
        kernels: grok1::kernels::describe(),
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        prefill_tok_s: a.prompt_tokens as f64 / prefill_s,
        decode_tok_s,
        weight_bytes_per_token: bytes,
        decode_gb_s,
        read_bandwidth_gb_s: bandwidth / 1e9,
        read_bandwidth_before_gb_s: before / 1e9,
        read_bandwidth_after_gb_s: after / 1e9,
        roofline_fraction: decode_gb_s * 1e9 / bandwidth,
        roofline_tok_s: bandwidth / bytes as f64,
        experts: model.model().store().map(|s| s.stats()),
        placement: loaded.placement.clone(),
        gpu,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("threads:        {} ({})", r.threads, r.kernels);
        println!("prefill:        {:.1} tok/s ({} tokens)", r.prefill_tok_s, r.prompt_tokens);
        println!("decode:         {:.2} tok/s ({} tokens)", r.decode_tok_s, r.gen_tokens);
        println!("weights/token:  {:.3} GB", bytes as f64 / 1e9);
        println!(
            "decode reads:   {:.2} GB/s = {:.0}% of the measured {:.2} GB/s read bandwidth (roofline {:.1} tok/s)",
            r.decode_gb_s,
            100.0 * r.roofline_fraction,
            r.read_bandwidth_gb_s,
            r.roofline_tok_s
        );
        println!(
            "bandwidth:      {:.2} GB/s before prefill, {:.2} GB/s after decoding",
            r.read_bandwidth_before_gb_s, r.read_bandwidth_after_gb_s
        );
        if let Some(s) = &r.experts {
            println!("{}", s.summary());
        }
        if let Some(g) = &r.gpu {
            println!(
                "device:         {:.0}% of chosen experts, {:.0} B in and {:.0} B out per token ({:.1} and {:.1} copies), {:.3} ms per token",
                100.0 * g.gpu_expert_hit_rate,
                g.pcie_h2d_bytes_per_token,
                g.pcie_d2h_bytes_per_token,
                g.pcie_h2d_copies_per_token,
                g.pcie_d2h_copies_per_token,
                g.gpu_ms_per_token
            );
        }
    }
    loaded.finish_trace()?;
    Ok(())
}
