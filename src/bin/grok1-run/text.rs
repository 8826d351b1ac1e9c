//! `tokenize` and `detokenize`.

use anyhow::{bail, Context, Result};
use clap::Args;
use grok1::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenizerSource {
    /// A converted model directory (its tokenizer.model is checked against the manifest).
    #[arg(long, conflicts_with = "tokenizer")]
    model: Option<PathBuf>,
    /// A SentencePiece tokenizer.model file.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl TokenizerSource {
    fn load(&self) -> Result<Tokenizer> {
        match (&self.model, &self.tokenizer) {
            (Some(m), _) => {
                let files = grok1::format::ConvertedModel::open(m)?;
                crate::load::tokenizer(&files)
            }
            (None, Some(t)) => Tokenizer::from_file(t).with_context(|| format!("reading {}", t.display())),
            (None, None) => bail!("give --model DIR or --tokenizer FILE"),
        }
    }
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    source: TokenizerSource,
    /// The text to tokenize.
    #[arg(required_unless_present = "file")]
    text: Option<String>,
    /// Tokenize every line of this file (lines split on \n only); one JSON array per line.
    #[arg(long, conflicts_with = "text")]
    file: Option<PathBuf>,
    /// Print pieces instead of ids.
    #[arg(long)]
    pieces: bool,
    /// Add the BOS token (the official runner does not).
    #[arg(long)]
    bos: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = a.source.load()?;
    let one = |text: &str| -> String {
        if a.pieces {
            let mut p = tok.encode_pieces(text);
            if a.bos {
                if let Some(b) = tok.bos_id().and_then(|b| tok.piece(b)) {
                    p.insert(0, b.to_string());
                }
            }
            serde_json::to_string(&p).unwrap()
        } else {
            serde_json::to_string(&tok.encode(text, a.bos, false)).unwrap()
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match (&a.text, &a.file) {
        (_, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", f.display()))?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            for line in text.split('\n') {
                writeln!(out, "{}", one(line))?;
            }
        }
        (Some(t), None) => writeln!(out, "{}", one(t))?,
        (None, None) => bail!("give a TEXT or --file"),
    }
    Ok(())
}

#[derive(Args)]
pub struct DetokenizeArgs {
    #[command(flatten)]
    source: TokenizerSource,
    /// Token ids, e.g. 1,2,3
    ids: String,
}

pub fn detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = a.source.load()?;
    let ids = crate::parse_tokens(&a.ids)?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
        bail!("token id {bad} is outside the vocabulary of {}", tok.vocab_size());
    }
    println!("{}", tok.decode(&ids));
    Ok(())
}
