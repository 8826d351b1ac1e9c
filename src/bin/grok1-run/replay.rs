//! `replay-trace`: a routing trace through the expert cache policies at several budgets.

use anyhow::Result;
use clap::Args;
use grok1::residency::replay::{parse_fraction, table, StoreClock};
use grok1::residency::trace::RoutingTrace;
use grok1::residency::StoreOptions;
use std::path::PathBuf;

#[derive(Args)]
pub struct ReplayArgs {
    /// A routing trace (`--trace-routing` of generate, logits or bench).
    trace: PathBuf,
    /// Cache sizes, as fractions of all the model's experts.
    #[arg(long, default_value = "1/8,1/4,1/2", value_delimiter = ',')]
    budgets: Vec<String>,
    /// The decayed-frequency policy's half-life in forward steps (the store's default).
    #[arg(long)]
    half_life: Option<f64>,
    #[arg(long)]
    json: bool,
}

pub fn replay(a: ReplayArgs) -> Result<()> {
    let trace = RoutingTrace::read(&a.trace)?;
    let budgets = a
        .budgets
        .iter()
        .map(|b| parse_fraction(b).map(|f| (b.trim().to_string(), f)).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let s = trace.shape;
    let half_life_steps = a.half_life.unwrap_or(StoreOptions::default().half_life_steps);
    let fetches = trace.fetches();
    let n_slots = s.n_layers * s.n_experts;
    let rows = table(&fetches, n_slots, &budgets, StoreClock { n_layers: s.n_layers, half_life_steps });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let requests: usize = fetches.iter().map(Vec::len).sum();
    println!(
        "{}: {} passes, {} tokens, {} layers x {} experts (top {}), {} expert requests",
        a.trace.display(),
        trace.passes.len(),
        trace.tokens(),
        s.n_layers,
        s.n_experts,
        s.top_k,
        requests
    );
    println!("{:<20} {:>8} {:>9} {:>10} {:>10} {:>9}", "policy", "budget", "experts", "hits", "misses", "hit rate");
    for r in &rows {
        println!(
            "{:<20} {:>8} {:>9} {:>10} {:>10} {:>8.1}%",
            r.policy,
            r.budget,
            r.capacity,
            r.hits,
            r.misses,
            100.0 * r.hit_rate
        );
    }
    Ok(())
}
