//! Building values from the allow-listed globals: numpy arrays and dtypes, the release's
//! `QuantizedWeight8bit`, torch tensors and storages, ordered dicts; and turning the final value
//! into a `Loaded`. Nothing here calls out of the crate: each global only selects which of these
//! plain values an opcode builds.

use super::{ArrayRef, Loaded, Obj, PResult, QuantRef, TorchTensorRef, Value, Vm};
use crate::checkpoint::strided::DType;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Global {
    NpReconstruct,
    NpNdarray,
    NpDtype,
    Bfloat16,
    QuantizedWeight8bit,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
    OrderedDict,
}

impl Global {
    pub(super) fn resolve(module: &str, name: &str) -> Option<Global> {
        use Global::*;
        Some(match (module, name) {
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => NpReconstruct,
            ("numpy", "ndarray") => NpNdarray,
            ("numpy", "dtype") => NpDtype,
            // The release's bf16 type comes from an extension module whose name the pickles do
            // not pin down reliably (ml_dtypes, jax.numpy, ...): the name is what matters.
            (_, "bfloat16") => Bfloat16,
            // The class lives in xai-org's model.py; checkpoint.py injects it into __main__.
            ("__main__" | "model", "QuantizedWeight8bit") => QuantizedWeight8bit,
            ("torch._utils", "_rebuild_tensor_v2") => RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => RebuildParameter,
            ("torch", "BFloat16Storage") => Storage(DType::BF16),
            ("torch", "HalfStorage") => Storage(DType::F16),
            ("torch", "FloatStorage") => Storage(DType::F32),
            ("collections", "OrderedDict") => OrderedDict,
            _ => return None,
        })
    }
}

impl<'a> Vm<'a> {
    pub(super) fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.heap.get(*i),
            _ => None,
        }
    }

    pub(super) fn obj_mut(&mut self, v: &Value) -> Option<&mut Obj> {
        match v {
            Value::Obj(i) => self.heap.get_mut(*i),
            _ => None,
        }
    }

    pub(super) fn tuple(&self, v: &Value, what: &str) -> PResult<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => Ok(t),
            _ => self.err(format!("{what}: expected a tuple, found {}", self.describe(v))),
        }
    }

    pub(super) fn int(&self, v: &Value, what: &str) -> PResult<i64> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            _ => self.err(format!("{what}: expected an integer, found {}", self.describe(v))),
        }
    }

    pub(super) fn usize(&self, v: &Value, what: &str) -> PResult<usize> {
        let i = self.int(v, what)?;
        usize::try_from(i).or_else(|_| self.err(format!("{what}: {i} is negative")))
    }

    pub(super) fn ints(&self, v: &Value, what: &str) -> PResult<Vec<usize>> {
        let t = self.tuple(v, what)?;
        if t.len() > 8 {
            return self.err(format!("{what}: {} dimensions", t.len()));
        }
        t.iter().map(|x| self.usize(x, what)).collect()
    }

    pub(super) fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("{b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {:?}", s.chars().take(40).collect::<String>()),
            Value::Bytes(s) => format!("{} bytes", s.len),
            Value::Global(g) => format!("global {g:?}"),
            Value::Obj(i) => match self.heap.get(*i) {
                Some(Obj::Tuple(t)) => format!("tuple of {}", t.len()),
                Some(Obj::List(l)) => format!("list of {}", l.len()),
                Some(Obj::Dict(d)) => format!("dict of {}", d.len()),
                Some(Obj::EmptyArray) => "ndarray without state".into(),
                Some(Obj::Array(a)) => format!("{:?} array {:?}", a.dtype, a.shape),
                Some(Obj::Dtype(d)) => format!("dtype {d:?}"),
                Some(Obj::Quant { .. }) => "QuantizedWeight8bit".into(),
                Some(Obj::Storage { .. }) => "torch storage".into(),
                Some(Obj::Tensor(t)) => format!("tensor {:?}", t.shape),
                None => "dangling object".into(),
            },
        }
    }

    pub(super) fn reduce(&mut self, func: Value, args: Value) -> PResult<Value> {
        let Value::Global(g) = func else {
            return self.err(format!(
                "REDUCE on {}: only allowed globals may be called",
                self.describe(&func)
            ));
        };
        let a = self.tuple(&args, "REDUCE arguments")?;
        // Every allowed callable takes at most 7 arguments; checking first keeps the copy small
        // even when a huge memoized tuple is passed again and again.
        if a.len() > 7 {
            return self.err(format!("REDUCE of {g:?} with {} arguments", a.len()));
        }
        let a = a.to_vec();
        match g {
            Global::NpReconstruct => {
                if !matches!(a.first(), Some(Value::Global(Global::NpNdarray))) {
                    return self.err("numpy _reconstruct of something other than numpy.ndarray");
                }
                self.alloc(Obj::EmptyArray)
            }
            Global::NpDtype => {
                let dt = match a.first() {
                    Some(Value::Global(Global::Bfloat16)) => DType::BF16,
                    Some(Value::Str(s)) => match &**s {
                        "f4" | "<f4" | "float32" => DType::F32,
                        "f2" | "<f2" | "float16" => DType::F16,
                        "i1" | "|i1" | "int8" => DType::I8,
                        "bfloat16" => DType::BF16,
                        other => return self.err(format!("unsupported numpy dtype `{other}`")),
                    },
                    _ => return self.err("numpy.dtype called without a type name"),
                };
                self.alloc(Obj::Dtype(dt))
            }
            // state_dict() pickles as OrderedDict() followed by SETITEMS; building one from a
            // list of pairs would copy the list at every REDUCE, quadratic on hostile input.
            Global::OrderedDict if a.is_empty() => self.alloc(Obj::Dict(Vec::new())),
            Global::OrderedDict => self.err("OrderedDict called with arguments"),
            Global::RebuildTensorV2 => self.rebuild_tensor(&a),
            Global::RebuildParameter => match a.first() {
                Some(v) if matches!(self.obj(v), Some(Obj::Tensor(_))) => Ok(v.clone()),
                _ => self.err("_rebuild_parameter of something that is not a tensor"),
            },
            other => self.err(format!("{other:?} cannot be called")),
        }
    }

    pub(super) fn rebuild_tensor(&mut self, a: &[Value]) -> PResult<Value> {
        if a.len() < 4 {
            return self.err(format!("_rebuild_tensor_v2 with {} arguments, expected 6", a.len()));
        }
        let Some(Obj::Storage { dtype, key, numel }) = self.obj(&a[0]) else {
            return self.err("_rebuild_tensor_v2 without a storage");
        };
        let (dtype, key, numel) = (*dtype, key.to_string(), *numel);
        let offset = self.usize(&a[1], "storage offset")?;
        let shape = self.ints(&a[2], "tensor size")?;
        let stride = self.ints(&a[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return self.err(format!("size {shape:?} and stride {stride:?} differ in rank"));
        }
        let t =
            TorchTensorRef { storage_key: key, dtype, storage_numel: numel, offset, shape, stride };
        self.alloc(Obj::Tensor(t))
    }

    pub(super) fn newobj(&mut self, cls: Value, args: Value) -> PResult<Value> {
        let a = self.tuple(&args, "NEWOBJ arguments")?;
        match cls {
            Value::Global(Global::QuantizedWeight8bit) if a.is_empty() => {
                self.alloc(Obj::Quant { weight: None, scales: None })
            }
            Value::Global(Global::OrderedDict) if a.is_empty() => self.alloc(Obj::Dict(Vec::new())),
            other => self.err(format!("NEWOBJ of {} is not allowed", self.describe(&other))),
        }
    }

    pub(super) fn build(&mut self, target: Value, state: Value) -> PResult<()> {
        let Some(i) = (match target {
            Value::Obj(i) if i < self.heap.len() => Some(i),
            _ => None,
        }) else {
            return self.err(format!("BUILD on {}", self.describe(&target)));
        };
        match &self.heap[i] {
            Obj::EmptyArray => {
                let a = self.array_state(&state)?;
                self.heap[i] = Obj::Array(a);
                Ok(())
            }
            Obj::Dtype(_) => {
                // (version, byteorder, subarray, names, fields, elsize, alignment, flags)
                let t = self.tuple(&state, "dtype state")?;
                match t.get(1) {
                    Some(Value::Str(s)) if &**s == ">" => {
                        self.err("big-endian arrays are not supported")
                    }
                    Some(Value::Str(_)) => Ok(()),
                    _ => self.err("dtype state without a byte order"),
                }
            }
            Obj::Quant { .. } => {
                let d = match self.obj(&state) {
                    Some(Obj::Dict(d)) => d,
                    Some(Obj::Tuple(t)) if t.len() == 2 => match self.obj(&t[0]) {
                        Some(Obj::Dict(d)) => d,
                        _ => return self.err("QuantizedWeight8bit state is not a dict"),
                    },
                    _ => return self.err("QuantizedWeight8bit state is not a dict"),
                };
                if d.len() > 2 {
                    return self.err(format!(
                        "QuantizedWeight8bit state has {} fields, expected weight and scales",
                        d.len()
                    ));
                }
                let d = d.clone();
                let (mut weight, mut scales) = (None, None);
                for (k, v) in d {
                    match &k {
                        Value::Str(s) if &**s == "weight" => weight = Some(v),
                        Value::Str(s) if &**s == "scales" => scales = Some(v),
                        _ => {
                            return self.err(format!(
                                "QuantizedWeight8bit field {}: expected weight and scales",
                                self.describe(&k)
                            ))
                        }
                    }
                }
                self.heap[i] = Obj::Quant { weight, scales };
                Ok(())
            }
            // An OrderedDict's instance attributes (a state dict's `_metadata`): not needed.
            Obj::Dict(_) => Ok(()),
            _ => self.err(format!("BUILD on {}", self.describe(&target))),
        }
    }

    pub(super) fn array_state(&self, state: &Value) -> PResult<ArrayRef> {
        let t = self.tuple(state, "ndarray state")?;
        // (version, shape, dtype, is_fortran, data); very old numpy leaves the version out.
        let t = match t.len() {
            5 => &t[1..],
            4 => t,
            n => return self.err(format!("ndarray state has {n} fields, expected 5")),
        };
        let shape = self.ints(&t[0], "ndarray shape")?;
        let dtype = match self.obj(&t[1]) {
            Some(Obj::Dtype(d)) => *d,
            _ => return self.err(format!("ndarray dtype is {}", self.describe(&t[1]))),
        };
        let fortran = matches!(t[2], Value::Bool(true) | Value::Int(1));
        if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
            return self.err("Fortran-ordered arrays are not supported (the release is C-ordered)");
        }
        let Value::Bytes(data) = t[3] else {
            return self.err(format!("ndarray data is {}, expected bytes", self.describe(&t[3])));
        };
        let n = shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d));
        if n != Some(data.len) {
            return self.err(format!(
                "{dtype:?} array of shape {shape:?} needs {} bytes, found {}",
                n.map_or("too many".into(), |n| n.to_string()),
                data.len
            ));
        }
        Ok(ArrayRef { dtype, shape, data })
    }

    pub(super) fn persistent(&mut self, pid: Value) -> PResult<Value> {
        let t = self.tuple(&pid, "persistent id")?;
        match t {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_loc), numel]
                if &**tag == "storage" =>
            {
                let (dtype, key) = (*dtype, key.clone());
                let numel = self.usize(numel, "storage size")?;
                self.alloc(Obj::Storage { dtype, key, numel })
            }
            [Value::Str(tag), Value::Global(g), ..] if &**tag == "storage" => {
                self.err(format!("storage type {g:?} is not supported: expected bf16, f16 or f32"))
            }
            _ => self.err("persistent id is not a torch storage reference"),
        }
    }

    pub(super) fn interpret(&self, root: Value) -> PResult<Loaded> {
        match self.obj(&root) {
            Some(Obj::Array(a)) => Ok(Loaded::Array(a.clone())),
            Some(Obj::Quant { weight, scales }) => {
                let get = |v: &Option<Value>, what: &str| match v.as_ref().and_then(|v| self.obj(v))
                {
                    Some(Obj::Array(a)) => Ok(a.clone()),
                    _ => self.err(format!("QuantizedWeight8bit.{what} is missing or not an array")),
                };
                Ok(Loaded::Quant(QuantRef {
                    weight: get(weight, "weight")?,
                    scales: get(scales, "scales")?,
                }))
            }
            Some(Obj::Dict(d)) => {
                let mut out = Vec::with_capacity(d.len());
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for (k, v) in d {
                    let Value::Str(name) = k else {
                        return self.err(format!("state dict key is {}", self.describe(k)));
                    };
                    let Some(Obj::Tensor(t)) = self.obj(v) else {
                        return self
                            .err(format!("state dict entry `{name}` is {}", self.describe(v)));
                    };
                    match seen.get(&**name) {
                        Some(&i) => out[i] = (name.to_string(), t.clone()),
                        None => {
                            seen.insert(name, out.len());
                            out.push((name.to_string(), t.clone()));
                        }
                    }
                }
                Ok(Loaded::StateDict(out))
            }
            _ => self.err(format!(
                "the pickle holds {}, expected an array, a QuantizedWeight8bit or a state dict",
                self.describe(&root)
            )),
        }
    }
}
