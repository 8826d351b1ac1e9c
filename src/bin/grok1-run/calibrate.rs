//! `calibrate`: run a converted model over a text and record what each expert sees
//! (`grok1::calib`; the file is `formats/calibration.md`).

use crate::load::{load, tokenizer};
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use grok1::calib::{file, Recorder};
use grok1::model::KvCache;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to run (UTF-8), tokenized with the model's tokenizer.
    #[arg(long)]
    file: PathBuf,
    /// Where to write the calibration.
    #[arg(long)]
    out: PathBuf,
    /// Tokens per chunk: each chunk starts a fresh context.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Stop after this many tokens of the text (default: all of it).
    #[arg(long)]
    max_tokens: Option<usize>,
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    if a.ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    if a.model.trace_routing.is_some() {
        bail!("--trace-routing is for generate, logits and bench: calibration observes the router itself");
    }
    let loaded = load(&a.model, Some(a.ctx))?;
    // The observer sees the experts the host computes: calibration runs on the CPU.
    let model = loaded.model.model();
    let config = model.config().clone();
    let tok = tokenizer(&loaded.files).context("calibration tokenizes its text with the model's tokenizer")?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut tokens = tok.encode(&text, false, false);
    if let Some(n) = a.max_tokens {
        tokens.truncate(n);
    }
    if tokens.is_empty() {
        bail!("{} holds no tokens", a.file.display());
    }
    let recorder = Arc::new(Recorder::new(&config));
    let start = Instant::now();
    let ctx = a.ctx.min(config.max_seq_len);
    let mut cache = KvCache::new(&config, ctx);
    let chunks = tokens.len().div_ceil(ctx);
    for (i, chunk) in tokens.chunks(ctx).enumerate() {
        cache.clear();
        model.prefill_observed(chunk, &mut cache, recorder.clone())?;
        eprint!("\rchunk {}/{chunks}, {:.1} s", i + 1, start.elapsed().as_secs_f64());
    }
    eprintln!();
    let dataset = a.file.file_name().map_or_else(|| a.file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let cal = recorder.finish(tokens.len() as u64, &dataset);
    file::save(&cal, &a.out)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "calibrated on {} tokens of {} in {chunks} chunk(s) of up to {ctx}, {secs:.1} s ({:.0} tokens/s); wrote {}",
        tokens.len(),
        a.file.display(),
        tokens.len() as f64 / secs,
        a.out.display()
    );
    // The routing, layer by layer: how unevenly the experts were used.
    for l in 0..config.n_layers {
        let shares: Vec<String> = (0..config.n_experts)
            .map(|e| format!("{:.3}", cal.expert(l, e).routed as f64 / (tokens.len() * config.n_experts_per_token) as f64))
            .collect();
        eprintln!("layer {l:>3} routing shares: {}", shares.join(" "));
    }
    Ok(())
}
