//! Loading a converted model, with a progress bar.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use grok1::format::ConvertedModel;
use grok1::model::Model;
use grok1::placement::{DeviceChoice, PlacedModel};
use grok1::tokenizer::Tokenizer;
use grok1::residency::trace::{RoutingTrace, TraceShape, TraceWriter};
use grok1::residency::{ExpertStore, StoreOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

pub struct Loaded {
    pub files: Arc<ConvertedModel>,
    pub model: PlacedModel,
    /// Where it runs, as printed.
    pub placement: String,
    /// The routing trace being written (`--trace-routing`).
    pub trace: Option<Arc<TraceWriter>>,
}

impl Loaded {
    /// Flush the routing trace, if one is written; call after the last forward pass.
    pub fn finish_trace(&self) -> Result<()> {
        if let Some(t) = &self.trace {
            t.finish()?;
        }
        Ok(())
    }
}

pub fn set_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    grok1::kernels::set_threads(n);
}

/// Load the model and place it as `--gpu-budget` / `--emulate-gpu` ask, for runs of up to
/// `context` positions (default: the model's maximum), printing where it runs.
pub fn load(args: &ModelArgs, context: Option<usize>) -> Result<Loaded> {
    set_threads(args.threads);
    let files = Arc::new(
        ConvertedModel::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?,
    );
    files.set_verify_all(args.verify_load);
    let t0 = std::time::Instant::now();
    let (dense, experts) = files.stored_bytes();
    let streamed = args.ram_budget.is_some() || args.no_expert_cache;
    let pb = ProgressBar::new(dense + if streamed { 0 } else { experts });
    pb.set_style(
        ProgressStyle::with_template("loading [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap(),
    );
    let mut model = if streamed {
        let weights = grok1::model::load::load_dense_weights(&files, &mut |n| pb.inc(n))?;
        pb.finish_and_clear();
        let opts = StoreOptions {
            ram_budget: args.ram_budget.unwrap_or(0),
            no_cache: args.no_expert_cache,
            read_path: args.read_path,
            io_threads: args.io_threads.max(1),
            prefetch: !args.no_prefetch && !args.no_expert_cache,
            ..StoreOptions::default()
        };
        let store = ExpertStore::open(files.clone(), &opts)?;
        let bytes = grok1::model::load::expert_bytes(&files);
        Model::with_store(files.config().clone(), weights, store, bytes)?
    } else {
        let weights = grok1::model::load::load_weights(&files, &mut |n| pb.inc(n))?;
        pb.finish_and_clear();
        Model::new(files.config().clone(), weights)?
    };
    if args.verify_load {
        // Start-up only: the experts read later are checked by their xxh3 as they are read.
        files.set_verify_all(false);
        eprintln!("verified what was loaded against the manifest's checksums ({:.2} s)", t0.elapsed().as_secs_f64());
    }
    let choice = match (args.emulate_gpu, args.gpu_budget) {
        (Some(budget), _) => DeviceChoice::Emulated { budget },
        (None, budget) => DeviceChoice::Gpu { budget },
    };
    let config = files.config();
    let shape = TraceShape { n_layers: config.n_layers, n_experts: config.n_experts, top_k: config.n_experts_per_token };
    let trace = match &args.trace_routing {
        Some(path) => {
            let w = Arc::new(TraceWriter::create(path, shape, args.trace_append)?);
            model.set_observer(w.clone());
            Some(w)
        }
        None => None,
    };
    let ranking = match &args.placement_trace {
        Some(path) => {
            let t = RoutingTrace::read(path)?;
            if (t.shape.n_layers, t.shape.n_experts) != (shape.n_layers, shape.n_experts) {
                bail!(
                    "{}: a trace of a model with {} layers of {} experts; this model has {} of {}",
                    path.display(),
                    t.shape.n_layers,
                    t.shape.n_experts,
                    shape.n_layers,
                    shape.n_experts
                );
            }
            Some(t.expert_ranking())
        }
        None => None,
    };
    let context = context.unwrap_or(config.max_seq_len);
    // Scratch for prefill batches of the whole context, up to 512 tokens at once.
    let (model, line) = PlacedModel::place_ranked(model, &files, choice, context, context.min(512), ranking.as_deref())?;
    eprintln!("{line}");
    Ok(Loaded { files, model, placement: line, trace })
}

/// The model's tokenizer, checked against the manifest's sha256.
pub fn tokenizer(files: &ConvertedModel) -> Result<Tokenizer> {
    Ok(grok1::model::load::load_tokenizer(files)?)
}
