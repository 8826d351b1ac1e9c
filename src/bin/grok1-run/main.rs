//! grok1-run: inference from the grok1 chunked format.

mod bench;
mod generate;
mod load;
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or tokens), streaming as it goes.
    Generate(generate::GenerateArgs),
    /// Write the logits at every position of a token sequence to a .npy file.
    Logits(generate::LogitsArgs),
    /// Measure prefill and decode speed against this machine's memory bandwidth.
    Bench(bench::BenchArgs),
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
