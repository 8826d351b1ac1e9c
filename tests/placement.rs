//! Placement and the device seam, checked with the emulated device (the CPU playing a GPU with
//! its own buffers and counted copies): with the dense weights and half the experts on the
//! "device", logits are bit-identical to the CPU run and within 1e-4 of the golden ones; the
//! copies per token and layer are the designed ones; a budget too small for the dense part
//! falls back to the CPU with the reason; the expert store never holds what the device holds;
//! and the CLI's `--emulate-gpu` / `--gpu-budget` paths.

mod common;

use common::*;
use grok1::convert::{convert, ConvertOptions};
use grok1::format::manifest::Compression;
use grok1::format::ConvertedModel;
use grok1::gpu::plan::GpuPlan;
use grok1::model::{KvCache, Model};
use grok1::placement::{model_bytes, plan_for, DeviceChoice, EmulatedDevice, PlacedModel};
use grok1::quant::QuantType;
use grok1::residency::{ExpertStore, StoreOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const LOSSLESS_TOL: f64 = 1e-4;

/// A plan with room for the KV cache, scratch, the dense part and exactly half the expert bytes.
fn half_plan(model: &Model, kv_tokens: usize) -> GpuPlan {
    let (c, w) = (model.config(), model.weights());
    let bytes = model_bytes(c, w);
    let all = plan_for(&bytes, c, u64::MAX / 4, kv_tokens, kv_tokens).unwrap();
    let base = all.kv_bytes + all.scratch_bytes + all.dense_bytes;
    let half = bytes.experts.iter().sum::<u64>() / 2;
    let p = plan_for(&bytes, c, base + half, kv_tokens, kv_tokens).unwrap();
    assert!(p.uses_gpu(), "{:?}", p.refused);
    assert_eq!(p.experts.len(), c.n_layers * c.n_experts / 2, "every expert has the same size");
    p
}

/// The same fixture's weights again, as the device's own copy, placed per `plan`.
fn device(f: &Fixture, plan: GpuPlan) -> EmulatedDevice {
    EmulatedDevice::new(&f.config(), plan, f.weights(QuantType::Bf16, QuantType::Bf16)).unwrap()
}

/// Every position's logits: the first `split` tokens by prefill, the rest decoded one by one.
fn run(prefill: &dyn Fn(&[u32], &mut KvCache) -> Vec<f32>, decode: &dyn Fn(u32, &mut KvCache) -> Vec<f32>, cfg: &grok1::GrokConfig, all: &[u32], split: usize) -> Vec<f32> {
    let mut cache = KvCache::new(cfg, all.len());
    let mut out = prefill(&all[..split], &mut cache);
    for &t in &all[split..] {
        out.extend(decode(t, &mut cache));
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn dense_and_half_the_experts_on_the_device_give_the_cpu_logits_bit_for_bit() {
    for f in all_fixtures() {
        let cpu = f.model(QuantType::Bf16, QuantType::Bf16);
        let toks = f.tokens();
        let plan = half_plan(&cpu, toks.all.len());
        let placed = PlacedModel::on_device(f.model(QuantType::Bf16, QuantType::Bf16), device(&f, plan));
        let c = cpu.config().clone();
        for split in [toks.all.len(), toks.prompt.len(), 1] {
            let ours = run(
                &|t, k| placed.prefill(t, k, true).unwrap(),
                &|t, k| placed.decode(t, k).unwrap(),
                &c,
                &toks.all,
                split,
            );
            let theirs =
                run(&|t, k| cpu.prefill(t, k, true).unwrap(), &|t, k| cpu.decode(t, k).unwrap(), &c, &toks.all, split);
            assert!(bits(&ours) == bits(&theirs), "{}: split {split}: the device's logits differ from the CPU's", f.name);
            let a = compare(&f.golden(), &ours);
            eprintln!("{} split {split} on the emulated device: {a:?}", f.name);
            assert!(a.max_abs < LOSSLESS_TOL, "{}: {a:?}", f.name);
        }
        let s = placed.gpu_stats().unwrap();
        assert!(s.experts_on_gpu > 0 && s.experts_on_gpu < s.experts_chosen, "{}: {s:?}", f.name);
    }
}

#[test]
fn copies_per_token_and_layer_are_the_designed_ones() {
    let f = micro_hf();
    let cpu = f.model(QuantType::Bf16, QuantType::Bf16);
    let c = cpu.config().clone();
    let (d, v, l_n) = (c.d_model as u64, c.vocab_size as u64, c.n_layers as u64);
    let toks = f.tokens();
    let t_n = toks.prompt.len() as u64;
    for everything in [false, true] {
        let plan = if everything {
            plan_for(&model_bytes(&c, cpu.weights()), &c, u64::MAX / 4, toks.all.len(), toks.all.len()).unwrap()
        } else {
            half_plan(&cpu, toks.all.len())
        };
        let placed = PlacedModel::on_device(f.model(QuantType::Bf16, QuantType::Bf16), device(&f, plan));
        let stats = || placed.gpu_stats().unwrap();
        let mut cache = KvCache::new(&c, toks.all.len());

        // Prefill: the embedding rows in; per layer the router's input out and (at most) the
        // host experts' sum in; the last row's logits out.
        placed.prefill(&toks.prompt, &mut cache, false).unwrap();
        let s = stats();
        assert_eq!(s.tokens, t_n);
        assert_eq!((s.d2h_copies, s.d2h_bytes), (l_n + 1, 4 * (l_n * t_n * d + v)), "{s:?}");
        assert!(s.h2d_copies >= 1 && s.h2d_copies <= 1 + l_n, "{s:?}");
        assert_eq!(s.h2d_bytes, 4 * t_n * d * s.h2d_copies, "{s:?}");

        for &tok in &toks.continuation {
            let before = stats();
            placed.decode(tok, &mut cache).unwrap();
            let s = stats() - before;
            assert_eq!(s.tokens, 1);
            assert_eq!((s.d2h_copies, s.d2h_bytes), (l_n + 1, 4 * (l_n * d + v)), "{s:?}");
            assert_eq!(s.h2d_bytes, 4 * d * s.h2d_copies, "{s:?}");
            assert_eq!(s.experts_chosen, l_n * c.n_experts_per_token as u64);
            if everything {
                // Nothing left for the host: only the embedding row goes in.
                assert_eq!(s.h2d_copies, 1, "{s:?}");
                assert_eq!(s.experts_on_gpu, s.experts_chosen);
            } else {
                assert!(s.h2d_copies >= 1 && s.h2d_copies <= 1 + l_n, "{s:?}");
                // One sum in per layer that routed anything to the host.
                let host_layers = s.h2d_copies - 1;
                assert!(s.experts_on_gpu + host_layers <= s.experts_chosen, "{s:?}");
            }
        }
    }
}

/// The device's experts are queued, the host computes its own meanwhile, then waits and adds:
/// with the device's thread held until the host's experts start, every layer with experts on
/// both sides counts as overlapped and none as serial, and the logits stay the CPU's.
#[test]
fn the_host_computes_its_experts_while_the_device_runs_its_own() {
    for f in all_fixtures() {
        let cpu = f.model(QuantType::Bf16, QuantType::Bf16);
        let c = cpu.config().clone();
        let toks = f.tokens();
        let placed = PlacedModel::on_device(
            f.model(QuantType::Bf16, QuantType::Bf16),
            device(&f, half_plan(&cpu, toks.all.len())),
        );
        let dev = placed.emulated_device().unwrap();
        dev.hold_queue(true);
        let split = toks.prompt.len();
        let ours = run(
            &|t, k| placed.prefill(t, k, true).unwrap(),
            &|t, k| placed.decode(t, k).unwrap(),
            &c,
            &toks.all,
            split,
        );
        let theirs =
            run(&|t, k| cpu.prefill(t, k, true).unwrap(), &|t, k| cpu.decode(t, k).unwrap(), &c, &toks.all, split);
        assert!(bits(&ours) == bits(&theirs), "{}: the overlapped schedule changed the logits", f.name);
        let o = dev.overlap();
        eprintln!("{}: {o:?}", f.name);
        assert_eq!(o.after, 0, "{}: the host waited for the device before computing its experts: {o:?}", f.name);
        // The prompt's prefill routes to device and host experts in every layer.
        assert!(o.during >= c.n_layers as u64, "{}: {o:?}", f.name);

        // Released, the same schedule still gives the same logits.
        dev.hold_queue(false);
        let again = run(
            &|t, k| placed.prefill(t, k, true).unwrap(),
            &|t, k| placed.decode(t, k).unwrap(),
            &c,
            &toks.all,
            split,
        );
        assert!(bits(&again) == bits(&theirs), "{}", f.name);
    }
}

#[test]
fn a_budget_too_small_for_the_dense_part_keeps_the_run_on_the_cpu_with_the_reason() {
    let f = micro_hf();
    let cpu = f.model(QuantType::Bf16, QuantType::Bf16);
    let c = cpu.config().clone();
    let bytes = model_bytes(&c, cpu.weights());
    let p = plan_for(&bytes, &c, bytes.dense_bytes() - 1, 16, 16).unwrap();
    let why = p.refused.clone().expect("refused");
    assert!(why.contains("dense weights"), "{why}");
    assert!(p.experts.is_empty() && p.used() == 0);
    let e = EmulatedDevice::new(&c, p, f.weights(QuantType::Bf16, QuantType::Bf16)).err().expect("no device");
    assert!(e.to_string().contains("dense weights"), "{e}");

    // Through `place`, on converted files: the CPU, and a line saying why.
    let tmp = tempfile::tempdir().unwrap();
    let files = converted(&f, tmp.path());
    let model = || Model::new(c.clone(), grok1::model::load::load_weights(&files, &mut |_| {}).unwrap()).unwrap();
    let (placed, line) = PlacedModel::place(model(), &files, DeviceChoice::Emulated { budget: 4096 }, 16, 16).unwrap();
    assert!(!placed.uses_device());
    assert!(line.contains("dense weights") && line.ends_with("running on the CPU"), "{line}");
    for choice in [DeviceChoice::Gpu { budget: Some(0) }, DeviceChoice::Cpu] {
        let (placed, line) = PlacedModel::place(model(), &files, choice, 16, 16).unwrap();
        assert!(!placed.uses_device() && line.contains("running on the CPU"), "{choice:?}: {line}");
    }
    #[cfg(not(feature = "cuda"))]
    {
        let (placed, line) = PlacedModel::place(model(), &files, DeviceChoice::Gpu { budget: None }, 16, 16).unwrap();
        assert!(!placed.uses_device());
        assert!(line.contains("without the cuda feature") && line.ends_with("running on the CPU"), "{line}");
    }
}

/// `f` converted losslessly (bf16 everywhere), so that the converted model's logits are the
/// fixture's.
fn converted(f: &Fixture, dst: &Path) -> Arc<ConvertedModel> {
    converted_with(f, dst, Compression::None)
}

fn converted_with(f: &Fixture, dst: &Path, compression: Compression) -> Arc<ConvertedModel> {
    let src = grok1::checkpoint::open(&f.dir, None).unwrap();
    let o =
        ConvertOptions { experts: QuantType::Bf16, dense: QuantType::Bf16, threads: 2, compression, ..Default::default() };
    convert(src.as_ref(), dst, &o, &mut |_| {}).unwrap();
    Arc::new(ConvertedModel::open(dst).unwrap())
}

#[test]
fn the_store_leaves_the_devices_experts_alone() {
    let f = micro_hf();
    let tmp = tempfile::tempdir().unwrap();
    let files = converted_with(&f, tmp.path(), Compression::Zstd);
    let c = files.config().clone();
    let toks = f.tokens();
    let cpu = Model::new(c.clone(), grok1::model::load::load_weights(&files, &mut |_| {}).unwrap()).unwrap();
    let expected = run(&|t, k| cpu.prefill(t, k, true).unwrap(), &|t, k| cpu.decode(t, k).unwrap(), &c, &toks.all, 3);

    // The device holds half the experts; then their chunks on disk are overwritten, so that a
    // store reading any of them fails (the zstd frame is gone).
    let plan = half_plan(&cpu, toks.all.len());
    let device = EmulatedDevice::upload(&files, plan.clone()).unwrap();
    for &(l, e) in &plan.experts {
        use std::io::{Seek, SeekFrom, Write};
        let chunk = files.expert_chunk(l, e);
        let mut shard = std::fs::OpenOptions::new().write(true).open(files.shard_path(chunk.shard)).unwrap();
        shard.seek(SeekFrom::Start(chunk.offset)).unwrap();
        shard.write_all(&vec![0xFF; chunk.bytes as usize]).unwrap();
    }

    // A RAM budget for two experts.
    let bytes = grok1::model::load::expert_bytes(&files);
    let opts = StoreOptions { ram_budget: 2 * bytes as u64, ..StoreOptions::default() };
    let store = ExpertStore::open(files.clone(), &opts).unwrap();
    let dense = grok1::model::load::load_dense_weights(&files, &mut |_| {}).unwrap();
    let streamed = Model::with_store(c.clone(), dense, store, bytes).unwrap();
    let placed = PlacedModel::on_device(streamed, device);
    let ours =
        run(&|t, k| placed.prefill(t, k, true).unwrap(), &|t, k| placed.decode(t, k).unwrap(), &c, &toks.all, 3);
    assert!(bits(&ours) == bits(&expected), "streamed + device logits differ from the CPU's");

    let store = placed.model().store().unwrap();
    let s = store.stats();
    let g = s.gpu.expect("the store knows about the device");
    assert!(g.hits > 0 && g.misses > 0, "{}", s.summary());
    // The store counts a device expert once per layer step, the device once per token.
    assert!(g.hits <= placed.gpu_stats().unwrap().experts_on_gpu, "{}", s.summary());
    for l in 0..c.n_layers {
        for e in 0..c.n_experts {
            if plan.holds(l, e) {
                assert!(!store.is_cached(l, e), "expert {e} of layer {l} is on the device and in the RAM cache");
            }
        }
    }
    assert_eq!(s.disk.errors, 0, "{}", s.summary());
}

fn grok1_run(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap();
    assert!(out.status.success(), "grok1-run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn the_cli_runs_on_the_emulated_device_and_reports_its_copies() {
    let f = micro_hf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    converted(&f, &dir);
    let model = dir.to_str().unwrap();
    let toks: Vec<String> = f.tokens().all.iter().map(|t| t.to_string()).collect();
    let toks = toks.join(",");
    let logits = |extra: &[&str]| {
        let out = tmp.path().join("l.npy");
        let mut args = vec!["logits", "--model", model, "--tokens", &toks, "--decode-from", "3", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = grok1_run(&args);
        (grok1::npy::read(&out).unwrap().data, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (cpu, _) = logits(&[]);
    let (emu, line) = logits(&["--emulate-gpu", "64M", "--ram-budget", "1K"]);
    assert!(line.starts_with("emulated device: "), "{line}");
    assert!(cpu == emu, "logits on the emulated device differ from the CPU's");
    let (small, line) = logits(&["--emulate-gpu", "1K"]);
    assert!(line.contains("emulated device not used") && line.contains("running on the CPU"), "{line}");
    assert!(cpu == small, "logits after the fallback differ");
    let (off, line) = logits(&["--gpu-budget", "0"]);
    assert!(line.starts_with("GPU budget 0: running on the CPU"), "{line}");
    assert!(cpu == off, "logits with --gpu-budget 0 differ");

    let out = grok1_run(&["bench", "--model", model, "--prompt-tokens", "4", "--gen-tokens", "4", "--json", "--emulate-gpu", "64M"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = &r["gpu"];
    let c = f.config();
    // Everything fits: per token only the embedding row goes in, and per layer the router's
    // input and at the end the logits come out.
    assert_eq!(g["gpu_expert_hit_rate"].as_f64(), Some(1.0), "{r}");
    assert_eq!(g["pcie_h2d_bytes_per_token"].as_f64(), Some((4 * c.d_model) as f64), "{r}");
    assert_eq!(g["pcie_d2h_bytes_per_token"].as_f64(), Some((4 * (c.n_layers * c.d_model + c.vocab_size)) as f64), "{r}");
    assert!(r["placement"].as_str().unwrap().starts_with("emulated device"), "{r}");
    let out = grok1_run(&["bench", "--model", model, "--prompt-tokens", "4", "--gen-tokens", "4", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["gpu"].is_null(), "{r}");
}
