//! `generate` and `logits`.

use crate::load::{load, tokenizer};
use crate::{parse_tokens, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use grok1::model::KvCache;
use grok1::sampling::Sampler;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (needs the model's tokenizer).
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    prompt: Option<String>,
    /// Prompt token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: Option<String>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n", default_value_t = 64)]
    n: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start the prompt with the BOS token (the official runner does not).
    #[arg(long)]
    bos: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let loaded = load(&a.model, None)?;
    let model = &loaded.model;
    let config = model.config().clone();
    let tok = match &a.prompt {
        Some(_) => Some(tokenizer(&loaded.files)?),
        None => loaded.files.tokenizer_path().and_then(|_| tokenizer(&loaded.files).ok()),
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.tokens) {
        (Some(text), _) => tok.as_ref().unwrap().encode(text, a.bos, false),
        (None, Some(t)) => {
            let mut ids = parse_tokens(t)?;
            if a.bos {
                ids.insert(0, config.bos_token_id);
            }
            ids
        }
        (None, None) => bail!("give --prompt or --tokens"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        bail!("token id {bad} is outside the vocabulary of {}", config.vocab_size);
    }
    let mut cache = KvCache::new(&config, prompt.len() + a.n);
    let mut sampler = Sampler::new(a.temperature, a.top_k, a.top_p, a.seed);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Some(t) = &tok {
        write!(out, "{}", t.decode(&prompt))?;
    } else {
        write!(out, "{:?} ->", prompt)?;
    }
    out.flush()?;

    let t0 = Instant::now();
    let logits = model.prefill(&prompt, &mut cache, false)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut next = sampler.sample(&logits);
    let mut generated = Vec::new();
    let mut printed = String::new();
    let mut logits = vec![0f32; config.vocab_size];
    let t1 = Instant::now();
    for i in 0..a.n {
        generated.push(next);
        match &tok {
            Some(t) => {
                // Print the new text only once it is whole UTF-8 (byte pieces arrive one by one).
                let text = t.decode(&generated);
                if !text.ends_with('\u{FFFD}') && text.starts_with(printed.as_str()) {
                    write!(out, "{}", &text[printed.len()..])?;
                    printed = text;
                }
            }
            None => write!(out, " {next}")?,
        }
        out.flush()?;
        if next == config.eos_token_id || i + 1 == a.n {
            break;
        }
        model.decode_into(next, &mut cache, &mut logits)?;
        next = sampler.sample(&logits);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    writeln!(out)?;
    let decoded = generated.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.2} tok/s)",
        prompt.len(),
        prefill_s,
        prompt.len() as f64 / prefill_s,
        decoded,
        decode_s,
        if decode_s > 0.0 { decoded as f64 / decode_s } else { 0.0 }
    );
    if let Some(store) = model.model().store() {
        eprintln!("{}", store.stats().summary());
    }
    loaded.finish_trace()?;
    Ok(())
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// Output .npy file: f32 [T, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Prefill the first K tokens as a batch, then decode the rest one by one through the KV
    /// cache (default: all by prefill).
    #[arg(long)]
    decode_from: Option<usize>,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let loaded = load(&a.model, Some(tokens.len().max(1)))?;
    let model = &loaded.model;
    let config = model.config();
    if tokens.is_empty() {
        bail!("no tokens given");
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        bail!("token id {bad} is outside the vocabulary of {}", config.vocab_size);
    }
    let k = a.decode_from.unwrap_or(tokens.len()).clamp(1, tokens.len());
    let mut cache = KvCache::new(config, tokens.len());
    let mut all = model.prefill(&tokens[..k], &mut cache, true)?;
    for &t in &tokens[k..] {
        all.extend(model.decode(t, &mut cache)?);
    }
    grok1::npy::write_f32(&a.out, &[tokens.len(), config.vocab_size], &all)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote logits [{}, {}] to {}", tokens.len(), config.vocab_size, a.out.display());
    loaded.finish_trace()?;
    Ok(())
}
