//! The CUDA C sources of the kernels, compiled at run time by NVRTC as one program. They are
//! plain strings, present in every build, so that their kernel list can be checked without CUDA.

use crate::quant::QuantType;

/// The files of the program, in the order they are concatenated (later files use earlier ones).
pub const FILES: [(&str, &str); 5] = [
    ("common.cu", include_str!("cu/common.cu")),
    ("matvec.cu", include_str!("cu/matvec.cu")),
    ("matmul.cu", include_str!("cu/matmul.cu")),
    ("ops.cu", include_str!("cu/ops.cu")),
    ("attention.cu", include_str!("cu/attention.cu")),
];

/// The whole program.
pub fn program() -> String {
    let mut s = String::new();
    for (name, text) in FILES {
        s.push_str(&format!("// ---- {name}\n"));
        s.push_str(text);
        s.push('\n');
    }
    s
}

/// Name of the decode kernel for a block type. Types without one (`layout::unsupported`) never
/// reach a launch: `layout::repack` refuses them.
pub fn matvec_kernel(q: QuantType) -> &'static str {
    match q {
        QuantType::F32 => "matvec_f32",
        QuantType::Bf16 => "matvec_bf16",
        QuantType::Q8_0 => "matvec_q8_0",
        QuantType::Q4_0 => "matvec_q4_0",
        QuantType::Iq4Nl => "matvec_iq4_nl",
        QuantType::Q4K => "matvec_q4_k",
        QuantType::Q4S => "matvec_q4_s",
        QuantType::Q3S | QuantType::Q2S => unreachable!("{q} has no device kernel (repack refuses it)"),
    }
}

/// Name of the batched (prefill) kernel for a block type, as `matvec_kernel`.
pub fn matmul_kernel(q: QuantType) -> &'static str {
    match q {
        QuantType::F32 => "matmul_f32",
        QuantType::Bf16 => "matmul_bf16",
        QuantType::Q8_0 => "matmul_q8_0",
        QuantType::Q4_0 => "matmul_q4_0",
        QuantType::Iq4Nl => "matmul_iq4_nl",
        QuantType::Q4K => "matmul_q4_k",
        QuantType::Q4S => "matmul_q4_s",
        QuantType::Q3S | QuantType::Q2S => unreachable!("{q} has no device kernel (repack refuses it)"),
    }
}

/// Every other kernel the program defines.
pub const OP_KERNELS: [&str; 9] = [
    "rms_norm_rows",
    "rope_rows",
    "softmax_rows",
    "gelu_tanh",
    "geglu",
    "gather_rows",
    "scatter_add_rows",
    "kv_write",
    "attention",
];

/// All kernel names: the matrix kernels of every block type, then the ops.
pub fn kernel_names() -> Vec<&'static str> {
    let on_device = || QuantType::ALL.into_iter().filter(|&q| super::layout::unsupported(q).is_none());
    let mut v: Vec<&'static str> = on_device().map(matvec_kernel).collect();
    v.extend(on_device().map(matmul_kernel));
    v.extend(OP_KERNELS);
    v
}

/// Names of the `extern "C" __global__` functions defined in the sources, by reading them: the
/// macro-generated matmul kernels are found through their `MATMUL_KERNEL(name, ...)` lines.
pub fn defined_kernels() -> Vec<String> {
    let mut out = Vec::new();
    for (_, text) in FILES {
        let mut rest = text;
        while let Some(i) = rest.find("extern \"C\" __global__ void ") {
            rest = &rest[i + "extern \"C\" __global__ void ".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != "__launch_bounds__" {
                out.push(name);
            }
        }
        for line in text.lines() {
            if let Some(args) = line.strip_prefix("MATMUL_KERNEL(") {
                out.push(args.split(',').next().unwrap_or("").trim().to_string());
            }
        }
    }
    out
}
