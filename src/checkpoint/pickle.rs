//! A restricted pickle reader for the two pickled checkpoint forms: the release's `ckpt-0` leaves
//! (numpy arrays and `QuantizedWeight8bit`) and `torch.save` state dicts.
//!
//! It is a small stack machine over the binary opcodes of protocols 2 to 5. It never imports or
//! calls anything: globals are looked up in a fixed allow-list and only ever build the handful of
//! value kinds below (arrays, dtypes, quantized weights, torch tensors, ordered dicts). Any other
//! global is refused by name.
//!
//! Payloads stay where they are: `BINBYTES`/`BINBYTES8` become byte ranges of the input, so a
//! 1.6 GB array costs a range check, not a copy. Hostile input is bounded: every length is
//! checked against the bytes left, and the stack, the memo and the number of objects are capped
//! (each opcode byte creates at most one object, so the caps also follow from the input size).

mod objects;

use super::strided::DType;
use objects::Global;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Why a pickle was refused, and at which byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub msg: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}

type PResult<T> = std::result::Result<T, PickleError>;

/// A byte range of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// A C-ordered numpy array whose bytes lie in the input.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayRef {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Span,
}

/// The release's `QuantizedWeight8bit(weight, scales)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantRef {
    pub weight: ArrayRef,
    pub scales: ArrayRef,
}

/// A tensor of a `torch.save` archive: a view of storage `key` (a record `data/{key}` in the zip).
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensorRef {
    pub storage_key: String,
    pub dtype: DType,
    /// Elements in the storage, as the pickle declares.
    pub storage_numel: usize,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

/// What a pickle held.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    Array(ArrayRef),
    Quant(QuantRef),
    /// Tensor name -> tensor, in file order (a later duplicate wins, as in Python).
    StateDict(Vec<(String, TorchTensorRef)>),
}

/// Upper bounds on what one pickle may build. `for_input` derives them from the input size.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_stack: usize,
    pub max_memo: usize,
    pub max_objects: usize,
}

impl Limits {
    /// Real checkpoints stay far below these: a release file builds about 40 objects, and a
    /// torch state dict about 15 per tensor (2115 tensors for Grok-1) with a stack of a few
    /// thousand (SETITEMS batches of 1000 pairs).
    pub fn for_input(len: usize) -> Limits {
        let n = len.max(64);
        Limits { max_stack: n.min(1 << 16), max_memo: n.min(1 << 20), max_objects: n.min(1 << 20) }
    }
}

/// Run the pickle in `data` and interpret its result.
pub fn load(data: &[u8]) -> PResult<Loaded> {
    let mut vm = Vm::new(data, Limits::for_input(data.len()));
    let root = vm.run()?;
    vm.interpret(root)
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Span),
    Global(Global),
    /// Index into the object arena. Containers live there, so values stay flat and cheap to
    /// copy, and no drop or walk ever recurses.
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `_reconstruct(ndarray, (0,), b'b')` before its BUILD.
    EmptyArray,
    Array(ArrayRef),
    Dtype(DType),
    Quant {
        weight: Option<Value>,
        scales: Option<Value>,
    },
    Storage {
        dtype: DType,
        key: Rc<str>,
        numel: usize,
    },
    Tensor(TorchTensorRef),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Start of the opcode being executed, for error messages.
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    heap: Vec<Obj>,
    limits: Limits,
}

fn opname(op: u8) -> String {
    match op {
        b'I' => "INT (protocol 0)".into(),
        b'L' => "LONG (protocol 0)".into(),
        b'S' => "STRING (protocol 0)".into(),
        b'V' => "UNICODE (protocol 0)".into(),
        b'F' => "FLOAT (protocol 0)".into(),
        b'i' => "INST".into(),
        b'o' => "OBJ".into(),
        b'P' => "PERSID (protocol 0)".into(),
        b'g' => "GET (protocol 0)".into(),
        b'p' => "PUT (protocol 0)".into(),
        b'T' | b'U' => "BINSTRING".into(),
        0x82..=0x84 => "EXT".into(),
        0x8f..=0x91 => "set opcode".into(),
        0x92 => "NEWOBJ_EX".into(),
        0x97 | 0x98 => "out-of-band buffer opcode".into(),
        _ => format!("0x{op:02x}"),
    }
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8], limits: Limits) -> Self {
        Vm {
            data,
            pos: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            heap: Vec::new(),
            limits,
        }
    }

    fn err<T>(&self, msg: impl Into<String>) -> PResult<T> {
        Err(PickleError { offset: self.op_pos, msg: msg.into() })
    }

    fn take(&mut self, n: usize) -> PResult<Span> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(PickleError {
                offset: self.op_pos,
                msg: format!(
                    "truncated: opcode 0x{:02x} needs {n} more bytes at byte {}, only {left} left",
                    self.data[self.op_pos], self.pos
                ),
            });
        }
        let s = Span { start: self.pos, len: n };
        self.pos += n;
        Ok(s)
    }

    fn bytes(&mut self, n: usize) -> PResult<&'a [u8]> {
        let s = self.take(n)?;
        Ok(&self.data[s.start..s.end()])
    }

    fn uint(&mut self, n: usize) -> PResult<u64> {
        let b = self.bytes(n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    fn len_field(&mut self, n: usize) -> PResult<usize> {
        let v = self.uint(n)?;
        usize::try_from(v).or_else(|_| self.err(format!("length {v} does not fit in memory")))
    }

    fn push(&mut self, v: Value) -> PResult<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.err(format!("stack deeper than {} entries", self.limits.max_stack));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&self) -> PResult<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.last().unwrap())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let Some(m) = self.marks.pop() else { return self.err("no MARK on the stack") };
        Ok(self.stack.split_off(m))
    }

    fn alloc(&mut self, o: Obj) -> PResult<Value> {
        if self.heap.len() >= self.limits.max_objects {
            return self.err(format!("more than {} objects", self.limits.max_objects));
        }
        self.heap.push(o);
        Ok(Value::Obj(self.heap.len() - 1))
    }

    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top()?.clone();
        if !self.memo.contains_key(&idx) && self.memo.len() >= self.limits.max_memo {
            return self.err(format!("memo larger than {} entries", self.limits.max_memo));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> PResult<()> {
        let v = u32::try_from(idx).ok().and_then(|i| self.memo.get(&i)).cloned();
        match v {
            Some(v) => self.push(v),
            None => self.err(format!("memo entry {idx} read before it was written")),
        }
    }

    fn string(&mut self, n: usize) -> PResult<Value> {
        let b = self.bytes(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<Value> {
        match Global::resolve(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => self.err(format!(
                "global `{module}.{name}` is not allowed: checkpoints are read as data, and \
                 only numpy arrays, QuantizedWeight8bit and torch tensors are known"
            )),
        }
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return self.err("GLOBAL name without a newline in its first 256 bytes");
        };
        let s = self.bytes(n + 1)?;
        std::str::from_utf8(&s[..n]).or_else(|_| self.err("GLOBAL name is not valid UTF-8"))
    }

    /// Execute until STOP; return the value left on the stack.
    fn run(&mut self) -> PResult<Value> {
        loop {
            self.op_pos = self.pos;
            if self.pos >= self.data.len() {
                return self.err("truncated: input ended before the STOP opcode");
            }
            let op = self.data[self.pos];
            self.pos += 1;
            match op {
                0x80 => {
                    let p = self.uint(1)?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: a hint for buffered readers; the frame must lie inside the input.
                    let n = self.len_field(8)?;
                    if n > self.data.len() - self.pos {
                        return self.err(format!(
                            "truncated: frame of {n} bytes, only {} left",
                            self.data.len() - self.pos
                        ));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.marks.is_empty() {
                        return self.err("STOP inside an open MARK");
                    }
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= self.limits.max_stack {
                        return self.err("too many open MARKs");
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.len_field(1)? } else { self.len_field(4)? };
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes is out of range"));
                    }
                    let b = self.bytes(n)?;
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                    let mut v = [fill; 8];
                    v[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(v)))?
                }
                b'G' => {
                    let b = self.bytes(8)?;
                    let v = f64::from_be_bytes(b.try_into().unwrap());
                    self.push(Value::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.len_field(1)?,
                        b'X' => self.len_field(4)?,
                        _ => self.len_field(8)?,
                    };
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.len_field(1)?,
                        b'B' => self.len_field(4)?,
                        _ => self.len_field(8)?,
                    };
                    let s = self.take(n)?;
                    self.push(Value::Bytes(s))?
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()))?;
                    self.push(v)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v)?
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()))?;
                    self.push(v)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items))?;
                    self.push(v)?
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let target = self.top()?.clone();
                    match self.obj_mut(&target) {
                        Some(Obj::List(l)) => l.extend(items),
                        _ => return self.err("APPEND to something that is not a list"),
                    }
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.push(v)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let v = self.alloc(Obj::Dict(pairs))?;
                    self.push(v)?
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    let pairs = self.pairs(items)?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target) {
                        Some(Obj::Dict(d)) => d.extend(pairs),
                        _ => return self.err("SETITEM on something that is not a dict"),
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.push(v)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let v = self.global(m, n)?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.newobj(cls, args)?;
                    self.push(v)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    self.build(target, state)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?
                }
                b'h' => {
                    let i = self.uint(1)?;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.uint(4)?;
                    self.memo_get(i)?
                }
                b'q' => {
                    let i = self.uint(1)? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.uint(4)? as u32;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .or_else(|_| self.err("memo index overflow"))?;
                    self.memo_put(i)?
                }
                _ => return self.err(format!("unsupported opcode {}", opname(op))),
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> PResult<Vec<(Value, Value)>> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for a dict");
        }
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(data: &[u8]) -> PickleError {
        load(data).unwrap_err()
    }

    #[test]
    fn refuses_unknown_globals_by_name() {
        let e = err(b"\x80\x02cos\nsystem\n.");
        assert!(e.msg.contains("`os.system`"), "{e}");
        let e = err(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.");
        assert!(e.msg.contains("builtins.eval"), "{e}");
    }

    #[test]
    fn reports_truncation_with_offset() {
        let e = err(b"\x80\x04B\x10\x00\x00\x00abc");
        assert_eq!(e.offset, 2);
        assert!(e.msg.contains("truncated"), "{e}");
        let e = err(b"\x80\x04N");
        assert!(e.msg.contains("STOP"), "{e}");
    }

    #[test]
    fn memo_and_containers_are_bounded() {
        // LONG_BINPUT far past the end must not allocate a huge table.
        let e = err(b"\x80\x04Nr\xff\xff\xff\x7fj\x00\x00\x00\x00.");
        assert!(e.msg.contains("memo entry 0"), "{e}");
        // 100k nested tuples: values are flat arena indices, so building and dropping them never
        // recurses; the result is refused as not a checkpoint value.
        let mut p = b"\x80\x04N".to_vec();
        p.extend(std::iter::repeat(0x85).take(100_000));
        p.push(b'.');
        assert!(load(&p).is_err());
    }

    #[test]
    fn reads_a_numpy_array_in_place() {
        // numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') + BUILD((1, (2,), dtype('f4'), False, data))
        let mut p = Vec::new();
        p.extend(b"\x80\x04\x8c\x15numpy.core.multiarray\x8c\x0c_reconstruct\x93");
        p.extend(b"\x8c\x05numpy\x8c\x07ndarray\x93K\x00\x85C\x01b\x87R");
        p.extend(b"(K\x01K\x02\x85\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f4\x89\x88\x87R");
        p.extend(
            b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89B\x08\x00\x00\x00",
        );
        let at = p.len();
        p.extend(1.5f32.to_le_bytes());
        p.extend((-2.0f32).to_le_bytes());
        p.extend(b"tb.");
        let Loaded::Array(a) = load(&p).unwrap() else { panic!() };
        assert_eq!(
            (a.dtype, a.shape.as_slice(), a.data),
            (DType::F32, &[2][..], Span { start: at, len: 8 })
        );
        // The same with a shape that does not match the bytes.
        let mut wrong = p.clone();
        let k = wrong.windows(3).position(|w| w == b"K\x02\x85").unwrap();
        wrong[k + 1] = 3;
        assert!(err(&wrong).msg.contains("needs 12 bytes, found 8"));
    }
}
