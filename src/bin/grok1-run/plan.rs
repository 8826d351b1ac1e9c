//! `plan`: where each part of a model goes on given hardware, and the decode speed to expect
//! (the cost model is documented in `residency::plan`).

use anyhow::Result;
use clap::Args;
use grok1::quant::QuantType;
use grok1::residency::{plan as make_plan, Hardware, PlanInput};
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanArgs {
    /// RAM of the machine, e.g. 128GB.
    #[arg(long, value_parser = crate::parse_size_arg)]
    ram: u64,
    /// GPU memory, e.g. 24GB (0 for none).
    #[arg(long, value_parser = crate::parse_size_arg, default_value = "0")]
    vram: u64,
    #[arg(long)]
    ram_bw: Option<f64>,
    #[arg(long)]
    disk_bw: Option<f64>,
    #[arg(long)]
    pcie_bw: Option<f64>,
    #[arg(long)]
    gpu_bw: Option<f64>,
    /// Expert type: q8, q4, q3 or q2.
    #[arg(long, default_value = "q4")]
    experts: QuantType,
    /// Dense type.
    #[arg(long, default_value = "q8")]
    dense: QuantType,
    /// RAM kept for the OS, activations and the program (default: the cost model's).
    #[arg(long, value_parser = crate::parse_size_arg)]
    ram_reserve: Option<u64>,
    /// Predict the mix `grok1-convert convert --target-size` would choose for this size (dense
    /// and experts) and plan with it.
    #[arg(long, value_parser = crate::parse_size_arg)]
    target_size: Option<u64>,
    /// The types --target-size chooses from (default: q8_0,q4_s).
    #[arg(long, value_delimiter = ',')]
    candidates: Option<Vec<QuantType>>,
    /// Plan for a converted model instead of Grok-1.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let (config, mut experts, dense, mut mean_bytes) = match &a.model {
        Some(dir) => {
            let m = grok1::format::manifest::Manifest::load(&dir.join(grok1::format::MANIFEST_FILE))?;
            // A mix plans with its mean expert.
            let mean = m.expert_mix.as_ref().map(|_| {
                m.experts.iter().map(|x| x.tensors.iter().map(|t| t.bytes).sum::<u64>()).sum::<u64>() / m.experts.len().max(1) as u64
            });
            (m.config.clone(), m.quant.experts, m.quant.dense, mean)
        }
        None => (grok1::GrokConfig::default(), a.experts, a.dense, None),
    };
    if let Some(target) = a.target_size {
        if a.model.is_some() {
            anyhow::bail!("--target-size plans a conversion: leave out --model");
        }
        let cands = a.candidates.clone().unwrap_or_else(|| grok1::calib::allocate::DEFAULT_CANDIDATES.to_vec());
        let (mix, mean) = grok1::target_size::predict_mix(&config, dense, target, &cands)?;
        let parts: Vec<String> = mix.iter().map(|(q, n)| format!("{n} {q}")).collect();
        let weights = 3 * config.d_model * config.ffn_size;
        println!(
            "target {:.2} GB: experts {} (uniform routing; with a calibration the most-routed get the precise types), {:.3} GB per expert on average, {:.3} bits per expert weight",
            target as f64 / 1e9,
            parts.join(", "),
            mean as f64 / 1e9,
            mean as f64 * 8.0 / weights as f64
        );
        mean_bytes = Some(mean);
        // The table names the type most experts get; its byte counts are the mix's mean.
        experts = mix.iter().max_by_key(|(_, n)| *n).map_or(experts, |m| m.0);
    }
    let mut hw = Hardware::new(a.ram, a.vram);
    if let Some(x) = a.ram_bw {
        hw.ram_gbps = x;
    }
    if let Some(x) = a.disk_bw {
        hw.disk_gbps = x;
    }
    if let Some(x) = a.pcie_bw {
        hw.pcie_gbps = x;
    }
    if let Some(x) = a.gpu_bw {
        hw.gpu_gbps = x;
    }
    let mut input = PlanInput::new(config, experts, dense, hw);
    input.expert_mean_bytes = mean_bytes;
    if let Some(r) = a.ram_reserve {
        input.ram_reserve = r;
    }
    let p = make_plan(&input)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!("{}", p.table().trim_end());
    }
    Ok(())
}
