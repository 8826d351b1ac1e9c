//! grok1-convert: Grok-1 checkpoint -> chunked, checksummed quantized format.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use grok1::convert::{convert, ConvertOptions, Progress};
use grok1::format::manifest::{Compression, Manifest};
use grok1::format::{inspect::inspect, verify, MANIFEST_FILE};
use grok1::quant::QuantType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

mod calibration {
    //! The convert command's calibration and size-target options.

    use anyhow::{Context, Result};
    use grok1::calib::Origin;
    use grok1::format::manifest::CalibrationUsed;
    use grok1::target_size::TargetChoice;
    use std::path::Path;
    use std::sync::Arc;

    /// Read a calibration for a model of config `c`, with the manifest's record of it.
    pub fn load(path: &Path, c: &grok1::GrokConfig) -> Result<(Arc<grok1::calib::Calibration>, CalibrationUsed)> {
        let cal = grok1::calib::load(path, c).with_context(|| format!("reading calibration {}", path.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let used = CalibrationUsed {
            file: path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            sha256: grok1::format::writer::sha256_hex(&bytes),
            kind: match cal.origin {
                Origin::Recorded => "grok1",
                Origin::Imatrix => "imatrix",
            }
            .into(),
            dataset: cal.dataset.clone(),
            routing: cal.has_routing(),
        };
        eprintln!(
            "calibration: {} ({}, {}{})",
            used.file,
            used.kind,
            if cal.tokens > 0 { format!("{} tokens of ", cal.tokens) } else { String::new() },
            if used.dataset.is_empty() { "unnamed text" } else { &used.dataset }
        );
        Ok((Arc::new(cal), used))
    }

    /// What `--target-size` chose.
    pub fn print_mix(ch: &TargetChoice, c: &grok1::GrokConfig) {
        let weights = (3 * c.d_model * c.ffn_size * c.n_layers * c.n_experts) as f64;
        let parts: Vec<String> = ch
            .mix
            .candidates
            .iter()
            .map(|q| format!("{} {q}", ch.types.iter().filter(|t| *t == q).count()))
            .collect();
        eprintln!(
            "target {:.3} GB: experts {} ({:.3} bits per expert weight); planned {:.3} GB dense + {:.3} GB experts = {:.3} GB",
            ch.mix.target_bytes as f64 / 1e9,
            parts.join(", "),
            ch.expert_bytes as f64 * 8.0 / weights,
            ch.dense_bytes as f64 / 1e9,
            ch.expert_bytes as f64 / 1e9,
            (ch.dense_bytes + ch.expert_bytes) as f64 / 1e9
        );
    }
}

#[derive(Parser)]
#[command(name = "grok1-convert", version, about = "Convert Grok-1 checkpoints to the grok1 chunked format")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a checkpoint directory (safetensors, ckpt-0 or torch .bin) into DST.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        /// Expert weights: q8 (int8), q4 (int4: q4_s, or iq4_nl for rows that are not whole
        /// 256-weight super-blocks), bf16 (lossless); q4_k, iq4_nl, q4_0 by name.
        #[arg(long, default_value = "q8")]
        experts: QuantType,
        /// Dense weights (embedding, attention): bf16 or q8; also q4 (q4_s, or iq4_nl for rows
        /// that are not whole 256-weight super-blocks), q4_k, iq4_nl, q4_0.
        #[arg(long, default_value = "bf16")]
        dense: QuantType,
        #[arg(long)]
        threads: Option<usize>,
        /// Continue an interrupted conversion, reusing shards whose checksums verify.
        #[arg(long)]
        resume: bool,
        /// Compress each expert chunk: zstd.
        #[arg(long, value_parser = ["zstd", "none"])]
        compress: Option<String>,
        /// Largest shard in MiB.
        #[arg(long, default_value_t = 4096)]
        shard_mib: u64,
        /// Hyper-parameters for checkpoints that do not carry them (ckpt-0).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A calibration (`grok1-run calibrate`, or a llama.cpp imatrix .dat): column importances
        /// for the expert quantizers that take them, routing frequencies for --target-size.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Choose a type per expert so that the shards total at most this (e.g. 110GB), the
        /// most-routed experts getting the more precise types; --experts is then unused.
        #[arg(long, value_parser = parse_size_arg)]
        target_size: Option<u64>,
        /// The types --target-size chooses from (default: q8_0,q4_s).
        #[arg(long, value_delimiter = ',')]
        candidates: Option<Vec<QuantType>>,
    },
    /// Recompute every checksum of a converted model.
    Verify {
        dst: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show config, quantization types, sizes and bits per weight.
    Inspect {
        dst: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a deterministic random Grok-architecture checkpoint (HF safetensors layout).
    Synth {
        #[arg(long, default_value = "tiny")]
        preset: String,
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tensor naming: keyfan (GrokForCausalLM) or hpcai (Grok1ModelForCausalLM).
        #[arg(long, default_value = "keyfan", value_parser = ["keyfan", "hpcai"])]
        naming: String,
        /// Largest safetensors shard in MiB.
        #[arg(long, default_value_t = 2048)]
        shard_mib: u64,
        /// Also write the tied `lm_head.weight`, as the keyfan upload does.
        #[arg(long)]
        lm_head: bool,
        /// Do not write a synthetic tokenizer.model.
        #[arg(long)]
        no_tokenizer: bool,
        /// Skew the routing so a few experts per layer take most tokens (0: even; 3: the
        /// favourite takes about a third of a layer's choices).
        #[arg(long, default_value_t = 0.0)]
        routing_skew: f64,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    grok1::size::parse_size(s).map_err(|e| e.to_string())
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ETA {{eta}}"
        ))
        .unwrap(),
    );
    pb
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Convert {
            src, dst, experts, dense, threads, resume, compress, shard_mib, config, calibration, target_size, candidates,
        } => {
            let source = grok1::checkpoint::open(&src, config.as_deref())
                .with_context(|| format!("reading checkpoint {}", src.display()))?;
            eprintln!("source: {}", source.describe());
            let mut opts = ConvertOptions {
                experts,
                dense,
                resume,
                compression: match compress.as_deref() {
                    Some("zstd") => Compression::Zstd,
                    _ => Compression::None,
                },
                shard_bytes: shard_mib << 20,
                ..ConvertOptions::default()
            };
            if let Some(t) = threads {
                opts.threads = t;
            }
            if candidates.is_some() && target_size.is_none() {
                bail!("--candidates is for --target-size");
            }
            if let Some(path) = &calibration {
                opts.calibration = Some(calibration::load(path, source.config())?);
            }
            if let Some(target) = target_size {
                let cands = candidates.unwrap_or_else(|| grok1::calib::allocate::DEFAULT_CANDIDATES.to_vec());
                let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads.max(1)).build()?;
                let cal = opts.calibration.as_ref().map(|(c, _)| &**c);
                let choice = pool.install(|| grok1::target_size::choose(source.as_ref(), &opts, target, &cands, cal))?;
                calibration::print_mix(&choice, source.config());
                choice.apply(&mut opts);
            }
            let start = Instant::now();
            let mut pb: Option<ProgressBar> = None;
            let summary = convert(source.as_ref(), &dst, &opts, &mut |p| match p {
                Progress::Start { input_bytes } => pb = Some(bar(input_bytes, "converting")),
                Progress::Reused { file, input_bytes } => {
                    let pb = pb.as_ref().unwrap();
                    pb.suspend(|| eprintln!("reusing {file} (checksum verified)"));
                    pb.inc(input_bytes);
                }
                Progress::Advance { input_bytes } => pb.as_ref().unwrap().inc(input_bytes),
                Progress::ShardDone { .. } => {}
            })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "converted {:.2} GB -> {:.2} GB in {secs:.1} s ({:.2} GB/s input); {} shard(s) written, {} reused",
                summary.input_bytes as f64 / 1e9,
                summary.output_bytes as f64 / 1e9,
                summary.input_bytes as f64 / 1e9 / secs,
                summary.shards_written,
                summary.shards_reused
            );
            if summary.int8_blocks_kept > 0 {
                eprintln!(
                    "q8_0: {} of {} blocks keep the checkpoint's own int8 values and scales; the rest were quantized from the dequantized weights",
                    summary.int8_blocks_kept, summary.q8_blocks
                );
            }
            if opts.compression == Compression::Zstd {
                eprintln!(
                    "zstd: expert chunks {:.3} GB raw -> {:.3} GB stored (ratio {:.3})",
                    summary.expert_raw_bytes as f64 / 1e9,
                    summary.expert_stored_bytes as f64 / 1e9,
                    summary.expert_stored_bytes as f64 / summary.expert_raw_bytes.max(1) as f64
                );
            }
            Ok(())
        }
        Cmd::Verify { dst, json } => {
            let total: u64 = Manifest::load(&dst.join(MANIFEST_FILE))
                .map(|m| m.shards.iter().map(|s| s.bytes).sum())
                .unwrap_or(0);
            let pb = if json { ProgressBar::hidden() } else { bar(total, "verifying") };
            let report = verify(&dst, &|n| pb.inc(n))?;
            pb.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for p in &report.problems {
                    println!("BAD {p}");
                }
                println!(
                    "{}: {} shard(s), {} dense tensor(s), {} expert chunk(s), {:.2} GB checked, {} problem(s)",
                    if report.ok { "OK" } else { "FAILED" },
                    report.shards,
                    report.dense_tensors,
                    report.expert_chunks,
                    report.bytes_checked as f64 / 1e9,
                    report.problems.len()
                );
            }
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Inspect { dst, json } => {
            let m = Manifest::load(&dst.join(MANIFEST_FILE))?;
            let i = inspect(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
                return Ok(());
            }
            let c = &i.config;
            println!("source:      {}", i.source);
            println!(
                "model:       {} layers, d_model {}, ffn {}, {} q / {} kv heads x {}, {} experts (top {}), vocab {}",
                c.n_layers, c.d_model, c.ffn_size, c.n_q_heads, c.n_kv_heads, c.head_dim,
                c.n_experts, c.n_experts_per_token, c.vocab_size
            );
            println!("quant:       experts {}, dense {}, compression {}", i.expert_type, i.dense_type, i.compression);
            println!("files:       {} shard(s), {:.3} GB", i.shards, i.total_bytes as f64 / 1e9);
            println!("{:<30} {:>8} {:>16} {:>14} {:>8}", "class", "tensors", "params", "bytes", "bits/w");
            for k in &i.classes {
                println!("{:<30} {:>8} {:>16} {:>14} {:>8.3}", k.class, k.tensors, k.params, k.bytes, k.bits_per_weight);
            }
            println!("weight bytes per decoded token: {:.3} GB", i.bytes_per_token as f64 / 1e9);
            if let Some(mix) = &i.expert_mix {
                let cands: Vec<String> = mix.candidates.iter().map(|q| q.to_string()).collect();
                println!(
                    "expert mix:  chosen per expert for a target of {:.3} GB from {}; {:.3} bits per expert weight",
                    mix.target_bytes as f64 / 1e9,
                    cands.join(", "),
                    i.expert_bits_per_weight
                );
            }
            if i.expert_types.len() > 1 || i.expert_mix.is_some() {
                println!("{:<30} {:>8} {:>16} {:>14} {:>8}", "expert type", "experts", "params", "bytes", "bits/w");
                for s in &i.expert_types {
                    println!("{:<30} {:>8} {:>16} {:>14} {:>8.3}", s.qtype, s.experts, s.params, s.bytes, s.bits_per_weight);
                }
            }
            if let Some(c) = &i.calibration {
                println!(
                    "calibration: {} ({}{}), sha256 {}",
                    c.file,
                    c.kind,
                    if c.dataset.is_empty() { String::new() } else { format!(", on {}", c.dataset) },
                    c.sha256
                );
            }
            Ok(())
        }
        Cmd::Synth { preset, out, seed, naming, shard_mib, lm_head, no_tokenizer, routing_skew } => {
            let Some(mut p) = grok1::synth::Preset::by_name(&preset) else {
                bail!("unknown preset `{preset}`; presets: {}", grok1::synth::Preset::NAMES.join(", "));
            };
            if !(routing_skew.is_finite() && routing_skew >= 0.0) {
                bail!("--routing-skew {routing_skew}: expected a number >= 0");
            }
            p.init.routing_skew = routing_skew;
            let tokenizer_model = if no_tokenizer {
                None
            } else if p.config.vocab_size < grok1::tokenizer::synth::MIN_VOCAB {
                eprintln!(
                    "note: vocabulary of {} is too small for a synthetic tokenizer (needs {}); use --tokens with this model",
                    p.config.vocab_size,
                    grok1::tokenizer::synth::MIN_VOCAB
                );
                None
            } else {
                Some(
                    grok1::tokenizer::synth::try_build_model(p.config.vocab_size)
                        .map_err(|e| anyhow::anyhow!("building a tokenizer for preset {preset}: {e}"))?,
                )
            };
            let opts = grok1::synth::SynthOptions {
                seed,
                naming: match naming.as_str() {
                    "hpcai" => grok1::checkpoint::Naming::Hpcai,
                    _ => grok1::checkpoint::Naming::Keyfan,
                },
                shard_bytes: shard_mib << 20,
                write_lm_head: lm_head,
                tokenizer_model,
                ..Default::default()
            };
            let plan = grok1::synth::plan(&p, &opts)?;
            let pb = bar(plan.data_bytes(), "writing");
            let start = Instant::now();
            let s = grok1::synth::write(&p, &out, &opts, &|n| pb.set_position(n))?;
            pb.finish_and_clear();
            eprintln!(
                "wrote preset {preset} ({} parameters, {} tensors) to {} in {:.1} s: {}",
                s.params,
                s.n_tensors,
                out.display(),
                start.elapsed().as_secs_f64(),
                s.files.join(", ")
            );
            Ok(())
        }
    }
}
