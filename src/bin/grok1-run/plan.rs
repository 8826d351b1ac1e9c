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
    /// Plan for a converted model instead of Grok-1.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let (config, experts, dense) = match &a.model {
        Some(dir) => {
            let m = grok1::format::manifest::Manifest::load(&dir.join(grok1::format::MANIFEST_FILE))?;
            (m.config.clone(), m.quant.experts, m.quant.dense)
        }
        None => (grok1::GrokConfig::default(), a.experts, a.dense),
    };
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
