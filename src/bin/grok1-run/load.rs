//! Loading a converted model, with a progress bar.

use crate::ModelArgs;
use anyhow::{Context, Result};
use grok1::format::ConvertedModel;
use grok1::model::Model;
use grok1::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Loaded {
    pub files: ConvertedModel,
    pub model: Model,
}

pub fn set_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    grok1::kernels::set_threads(n);
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    set_threads(args.threads);
    let files = ConvertedModel::open(&args.model)
        .with_context(|| format!("opening model {}", args.model.display()))?;
    let (dense, experts) = files.stored_bytes();
    let pb = ProgressBar::new(dense + experts);
    pb.set_style(
        ProgressStyle::with_template("loading [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap(),
    );
    let weights = grok1::model::load::load_weights(&files, &mut |n| pb.inc(n))?;
    pb.finish_and_clear();
    let model = Model::new(files.config().clone(), weights)?;
    Ok(Loaded { files, model })
}

/// The model's tokenizer, checked against the manifest's sha256.
pub fn tokenizer(files: &ConvertedModel) -> Result<Tokenizer> {
    Ok(grok1::model::load::load_tokenizer(files)?)
}
