//! grok1-run: inference from the grok1 chunked format.

mod bench;
mod calibrate;
mod generate;
mod load;
mod plan;
mod replay;
mod text;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "grok1-run", version, about = "Run Grok-1 from the grok1 chunked format")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every command that loads a model shares.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A directory written by `grok1-convert convert`.
    #[arg(long)]
    pub model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Bound the RAM held by expert weights (e.g. 24GB, 512MiB): the rest are read from the
    /// model's chunks on demand, the most used kept. Default: every expert in RAM.
    #[arg(long, value_parser = parse_size_arg)]
    pub ram_budget: Option<u64>,
    /// Read every expert from disk when needed, with no cache and no prefetch (a baseline).
    #[arg(long)]
    pub no_expert_cache: bool,
    /// How cold experts are read: direct (O_DIRECT), pread or mmap.
    #[arg(long, default_value = "direct")]
    pub read_path: grok1::residency::ReadPath,
    /// Threads reading experts from disk.
    #[arg(long, default_value_t = 2)]
    pub io_threads: usize,
    /// Do not prefetch the next layer's likely experts.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Check every byte loaded at start-up against the manifest's checksums (xxh3, or sha256 in
    /// models converted before xxh3 was recorded): the dense tensors, and the experts loaded into
    /// RAM. Without it, expert chunks are checked on every read (xxh3, where recorded) and dense
    /// tensors only for their size.
    #[arg(long)]
    pub verify_load: bool,
    /// Device memory the GPU may take for the dense weights, KV cache and the hottest experts
    /// (e.g. 20G; 0 keeps the GPU out). Default: the device's free memory less a margin.
    #[arg(long, value_parser = parse_size_arg)]
    pub gpu_budget: Option<u64>,
    /// Run on a device emulated by the CPU, of this many bytes (its own buffers, counted
    /// copies, the CPU's kernels): the GPU schedule without a GPU, for tests.
    #[arg(long, value_parser = parse_size_arg, conflicts_with = "gpu_budget")]
    pub emulate_gpu: Option<u64>,
    /// Write what the router chose and its probabilities, per token and layer, to this file
    /// (a routing trace, formats/routing-trace.md), for `replay-trace` and `--placement-trace`.
    #[arg(long)]
    pub trace_routing: Option<PathBuf>,
    /// Append to the `--trace-routing` file (of the same model) instead of replacing it.
    #[arg(long, requires = "trace_routing")]
    pub trace_append: bool,
    /// Place experts on the device (`--gpu-budget`, `--emulate-gpu`) by how often this routing
    /// trace used them, instead of spreading them evenly over the layers.
    #[arg(long)]
    pub placement_trace: Option<PathBuf>,
}

/// Sizes on the command line (`24GB`, `512MiB`), as `grok1::size::parse_size` reads them.
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    grok1::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or tokens), streaming as it goes.
    Generate(generate::GenerateArgs),
    /// Write the logits at every position of a token sequence to a .npy file.
    Logits(generate::LogitsArgs),
    /// Measure prefill and decode speed against this machine's memory bandwidth.
    Bench(bench::BenchArgs),
    /// Where each part of a model goes on given hardware, and the decode speed to expect.
    Plan(plan::PlanArgs),
    /// Record what each expert sees on a text (for `grok1-convert convert --calibration`).
    Calibrate(calibrate::CalibrateArgs),
    /// Replay a routing trace through expert cache policies (LRU, ARC, the store's decayed
    /// frequency, and the offline optimum MIN) at several budgets; print their hit rates.
    ReplayTrace(replay::ReplayArgs),
    /// Print the token ids (or pieces) of a text.
    Tokenize(text::TokenizeArgs),
    /// Print the text of a list of token ids.
    Detokenize(text::DetokenizeArgs),
}

fn main() {
    let result: Result<()> = match Cli::parse().cmd {
        Cmd::Generate(a) => generate::generate(a),
        Cmd::Logits(a) => generate::logits(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Plan(a) => plan::plan(a),
        Cmd::Calibrate(a) => calibrate::calibrate(a),
        Cmd::ReplayTrace(a) => replay::replay(a),
        Cmd::Tokenize(a) => text::tokenize(a),
        Cmd::Detokenize(a) => text::detokenize(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Parse `1,2,3` (spaces allowed).
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().map_err(|_| anyhow::anyhow!("`{t}` is not a token id")))
        .collect()
}
