//! A small, restricted pickle reader and writer for PyTorch checkpoints.
//!
//! The reader executes no code: it understands the opcodes `torch.save` emits (protocol 2, plus the
//! common protocol 3-5 additions) and resolves only a whitelist of globals (`collections.OrderedDict`,
//! the tensor/parameter rebuild functions, storage types and a few harmless builtins). Everything
//! else fails with an error that names the opcode or the global.
//!
//! The writer emits exactly the byte stream Python's pickler produces (protocol 2) for
//! `torch.save(OrderedDict of contiguous CPU tensors)`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::DType;

/// Nesting limit for tuples used as dict keys (hashing is recursive).
const MAX_KEY_DEPTH: usize = 64;

/// A reference to a storage record of the archive (a pickle persistent id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    /// Record key: the bytes live in `<dir>/data/<key>`.
    pub key: String,
    /// Element type of the storage.
    pub dtype: DType,
    /// Device the storage was saved from (`cpu`, `cuda:0`, ...); informational only.
    pub location: String,
    /// Number of elements of the storage.
    pub numel: u64,
}

/// A (possibly strided) tensor view into a storage, as rebuilt by `_rebuild_tensor_v2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    /// Offset into the storage, in elements.
    pub offset: u64,
    pub size: Vec<u64>,
    /// Strides in elements, one per dimension.
    pub stride: Vec<u64>,
}

/// Whitelisted Python globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(DType),
    TorchSize,
    TorchDevice,
    TorchDtype,
    CodecsEncode,
    Set,
}

/// A sequence of values whose drop is iterative, so deeply nested input cannot overflow the stack.
#[derive(Default)]
pub(crate) struct Seq(pub Vec<Value>);

/// An insertion-ordered Python dict.
#[derive(Default)]
pub(crate) struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<HashKey, usize>,
}

/// An unpickled Python value (only the kinds a checkpoint can contain).
#[derive(Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside the i64 range (its value is not kept).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Rc<RefCell<Seq>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// A whitelisted object that is accepted but not interpreted (e.g. a `torch.device`).
    Opaque(&'static str),
}

impl Value {
    /// Python-ish type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Opaque(name) => name,
        }
    }

    fn new_dict(dict: Dict) -> Value {
        Value::Dict(Rc::new(RefCell::new(dict)))
    }

    fn new_list(items: Vec<Value>) -> Value {
        Value::List(Rc::new(RefCell::new(Seq(items))))
    }

    fn new_tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(Seq(items)))
    }
}

/// Shallow debug output (never recurses, so cyclic or deep values are safe to print).
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "Int({i})"),
            Value::Float(x) => write!(f, "Float({x})"),
            Value::Bool(b) => write!(f, "Bool({b})"),
            Value::Str(s) => write!(f, "Str({s:?})"),
            Value::Tensor(t) => write!(f, "Tensor({:?} of storage '{}')", t.size, t.storage.key),
            other => f.write_str(other.type_name()),
        }
    }
}

/// Moves the children of a uniquely owned container into `out` (used by the iterative drops).
fn detach_children(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Tuple(rc) => {
            if let Ok(mut seq) = Rc::try_unwrap(rc) {
                out.append(&mut seq.0);
            }
        }
        Value::List(rc) => {
            if let Ok(cell) = Rc::try_unwrap(rc) {
                out.append(&mut cell.into_inner().0);
            }
        }
        Value::Dict(rc) => {
            if let Ok(cell) = Rc::try_unwrap(rc) {
                let mut dict = cell.into_inner();
                dict.index.clear();
                for (k, v) in dict.entries.drain(..) {
                    out.push(k);
                    out.push(v);
                }
            }
        }
        _ => {}
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        let mut work = std::mem::take(&mut self.0);
        while let Some(v) = work.pop() {
            detach_children(v, &mut work);
        }
    }
}

impl Drop for Dict {
    fn drop(&mut self) {
        let mut work = Vec::with_capacity(self.entries.len() * 2);
        for (k, v) in self.entries.drain(..) {
            work.push(k);
            work.push(v);
        }
        while let Some(v) = work.pop() {
            detach_children(v, &mut work);
        }
    }
}

/// Hashable form of a dict key (Python semantics: `True == 1`, `1.0 == 1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HashKey {
    None,
    Int(i64),
    Float(u64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Vec<HashKey>),
    Global(Global),
    Identity(usize),
}

impl HashKey {
    fn of(value: &Value, depth: usize) -> Result<HashKey> {
        ensure!(depth < MAX_KEY_DEPTH, "dict key nested too deeply");
        Ok(match value {
            Value::None => HashKey::None,
            Value::Bool(b) => HashKey::Int(i64::from(*b)),
            Value::Int(i) => HashKey::Int(*i),
            Value::Float(f) => {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    HashKey::Int(*f as i64)
                } else {
                    HashKey::Float(f.to_bits())
                }
            }
            Value::Str(s) => HashKey::Str(s.clone()),
            Value::Bytes(b) => HashKey::Bytes(b.clone()),
            Value::Tuple(t) => HashKey::Tuple(
                t.0.iter()
                    .map(|v| HashKey::of(v, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            Value::Global(g) => HashKey::Global(*g),
            Value::Tensor(t) => HashKey::Identity(Rc::as_ptr(t) as usize),
            Value::Storage(s) => HashKey::Identity(Rc::as_ptr(s) as usize),
            other => bail!("unsupported dict key of type {}", other.type_name()),
        })
    }
}

impl Dict {
    /// Inserts or replaces (keeping the original position, like Python).
    fn insert(&mut self, key: Value, value: Value) -> Result<()> {
        let hk = HashKey::of(&key, 0)?;
        match self.index.get(&hk) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(hk, self.entries.len());
                self.entries.push((key, value));
            }
        }
        Ok(())
    }

    /// Looks up a string key.
    pub fn get_str(&self, key: &str) -> Option<&Value> {
        let i = *self.index.get(&HashKey::Str(Rc::from(key)))?;
        Some(&self.entries[i].1)
    }

    /// Entries in insertion order.
    pub fn entries(&self) -> &[(Value, Value)] {
        &self.entries
    }
}

/// Python's name of an opcode, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Maps a `module.name` global to the whitelist, or explains why it is refused.
fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let storage = |dtype| Ok(Global::Storage(dtype));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "CharStorage") => storage(DType::I8),
        ("torch", "ByteStorage") => storage(DType::U8),
        ("torch", "BoolStorage") => storage(DType::Bool),
        ("torch", "Size") => Ok(Global::TorchSize),
        ("torch", "device") => Ok(Global::TorchDevice),
        (
            "torch",
            "float32" | "float" | "float64" | "double" | "float16" | "half" | "bfloat16" | "int64"
            | "long" | "int32" | "int" | "int16" | "short" | "int8" | "uint8" | "bool",
        ) => Ok(Global::TorchDtype),
        ("_codecs", "encode") => Ok(Global::CodecsEncode),
        ("builtins" | "__builtin__", "set" | "frozenset") => Ok(Global::Set),
        _ if module.starts_with("__torch__") => {
            bail!("unsupported pickle global '{module}.{name}' (a TorchScript class)")
        }
        _ => bail!(
            "unsupported pickle global '{module}.{name}': only tensors, storages and plain \
             containers can be loaded (no Python code is executed); save the weights with \
             torch.save(model.state_dict())"
        ),
    }
}

/// Reads a pickle from `data` and returns the top-level object.
pub(crate) fn unpickle(data: &[u8]) -> Result<Value> {
    let mut u = Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    u.run()
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn run(&mut self) -> Result<Value> {
        loop {
            let op_pos = self.pos;
            let op = self.u8().context("pickle ends without a STOP opcode")?;
            match self.step(op) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "pickle opcode {} (0x{op:02x}) at byte {op_pos}",
                        opcode_name(op)
                    )))
                }
            }
        }
    }

    /// Executes one opcode; returns the result on STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value>> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                ensure!(proto <= 5, "unsupported pickle protocol {proto}");
            }
            0x95 => {
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.stack.len() > self.frame_base() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?.clone();
                self.stack.push(top);
            }
            b'}' => self.stack.push(Value::new_dict(Dict::default())),
            b']' => self.stack.push(Value::new_list(Vec::new())),
            b')' => self.stack.push(Value::new_tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::new_tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let base = self.stack.len().checked_sub(n);
                match base {
                    Some(base) if base >= self.frame_base() => {
                        let items = self.stack.split_off(base);
                        self.stack.push(Value::new_tuple(items));
                    }
                    _ => bail!("stack underflow"),
                }
            }
            b'X' => {
                let n = self.u32()? as usize;
                self.push_str(n)?;
            }
            0x8c => {
                let n = usize::from(self.u8()?);
                self.push_str(n)?;
            }
            0x8d => {
                let n = self.u64_len()?;
                self.push_str(n)?;
            }
            b'T' => {
                let n = self.i32()?;
                ensure!(n >= 0, "negative string length");
                self.push_str(n as usize)?;
            }
            b'U' => {
                let n = usize::from(self.u8()?);
                self.push_str(n)?;
            }
            b'B' => {
                let n = self.u32()? as usize;
                self.push_bytes(n)?;
            }
            b'C' => {
                let n = usize::from(self.u8()?);
                self.push_bytes(n)?;
            }
            0x8e => {
                let n = self.u64_len()?;
                self.push_bytes(n)?;
            }
            b'J' => {
                let v = self.i32()?;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'M' => {
                let b = self.take(2)?;
                self.stack
                    .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
            }
            0x8a => {
                let n = usize::from(self.u8()?);
                let bytes = self.take(n)?;
                self.stack.push(decode_long(bytes));
            }
            0x8b => {
                let n = self.i32()?;
                ensure!(n >= 0, "negative LONG4 length");
                let bytes = self.take(n as usize)?;
                self.stack.push(decode_long(bytes));
            }
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.stack.push(Value::Float(f64::from_be_bytes(a)));
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = resolve_global(&module, &name)?;
                self.stack.push(Value::Global(g));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (&module, &name) {
                    (Value::Str(m), Value::Str(n)) => {
                        let g = resolve_global(m, n)?;
                        self.stack.push(Value::Global(g));
                    }
                    _ => bail!("STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                let result = call(&func, &args)?;
                self.stack.push(result);
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                match &kwargs {
                    Value::Dict(d) if d.borrow().entries.is_empty() => {}
                    _ => bail!("keyword arguments are not supported"),
                }
                let result = call(&cls, &args)?;
                self.stack.push(result);
            }
            b'b' => {
                let state = self.pop()?;
                build(self.top()?, &state)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = persistent_load(&pid)?;
                self.stack.push(storage);
            }
            b'q' => {
                let idx = u32::from(self.u8()?);
                self.memo_put(idx)?;
            }
            b'r' => {
                let idx = self.u32()?;
                self.memo_put(idx)?;
            }
            0x94 => {
                let idx = u32::try_from(self.memo.len()).context("memo too large")?;
                self.memo_put(idx)?;
            }
            b'h' => {
                let idx = u32::from(self.u8()?);
                self.memo_get(idx)?;
            }
            b'j' => {
                let idx = self.u32()?;
                self.memo_get(idx)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                dict_of(self.top()?)?.borrow_mut().insert(key, value)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                let dict = dict_of(self.top()?)?.clone();
                let mut dict = dict.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.insert(k, v)?;
                }
            }
            b'a' => {
                let value = self.pop()?;
                list_of(self.top()?)?.borrow_mut().0.push(value);
            }
            b'e' | 0x90 => {
                let mut items = self.pop_mark()?;
                list_of(self.top()?)?.borrow_mut().0.append(&mut items);
            }
            b'd' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "DICT with an odd number of items");
                let mut dict = Dict::default();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.insert(k, v)?;
                }
                self.stack.push(Value::new_dict(dict));
            }
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.stack.push(Value::new_list(items));
            }
            0x8f => self.stack.push(Value::new_list(Vec::new())),
            _ => bail!("unsupported pickle opcode"),
        }
        Ok(None)
    }

    fn frame_base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.frame_base() {
            bail!("stack underflow");
        }
        self.stack.pop().ok_or_else(|| anyhow!("stack underflow"))
    }

    fn top(&self) -> Result<&Value> {
        if self.stack.len() <= self.frame_base() {
            bail!("stack underflow");
        }
        self.stack.last().ok_or_else(|| anyhow!("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let base = self.marks.pop().context("no MARK on the stack")?;
        ensure!(base <= self.stack.len(), "corrupt MARK");
        Ok(self.stack.split_off(base))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let top = self.top()?.clone();
        self.memo.insert(idx, top);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .with_context(|| format!("memo entry {idx} is missing"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("pickle is truncated (needs {n} more bytes)"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_len(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).context("length does not fit in memory")
    }

    /// Reads a newline-terminated line (for GLOBAL).
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .context("GLOBAL name is not terminated by a newline")?;
        let s = std::str::from_utf8(&rest[..n]).context("GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }

    fn push_str(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        let s = match std::str::from_utf8(bytes) {
            Ok(s) => Rc::from(s),
            // Python 2 byte strings (BINSTRING) may be latin-1.
            Err(_) => Rc::from(bytes.iter().map(|&b| char::from(b)).collect::<String>()),
        };
        self.stack.push(Value::Str(s));
        Ok(())
    }

    fn push_bytes(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        self.stack.push(Value::Bytes(Rc::from(bytes)));
        Ok(())
    }
}

/// Decodes a little-endian two's complement integer (LONG1/LONG4).
fn decode_long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let fill = if negative { 0xff } else { 0 };
        let sign_ok = bytes[8..].iter().all(|&b| b == fill) && ((bytes[7] & 0x80 != 0) == negative);
        if !sign_ok {
            return Value::BigInt;
        }
    }
    let negative = bytes[bytes.len().min(8) - 1] & 0x80 != 0;
    let mut a = if negative { [0xffu8; 8] } else { [0u8; 8] };
    let n = bytes.len().min(8);
    a[..n].copy_from_slice(&bytes[..n]);
    Value::Int(i64::from_le_bytes(a))
}

fn dict_of(v: &Value) -> Result<&Rc<RefCell<Dict>>> {
    match v {
        Value::Dict(d) => Ok(d),
        other => bail!("expected a dict, found {}", other.type_name()),
    }
}

fn list_of(v: &Value) -> Result<&Rc<RefCell<Seq>>> {
    match v {
        Value::List(l) => Ok(l),
        other => bail!("expected a list, found {}", other.type_name()),
    }
}

fn tuple_items(v: &Value) -> Result<&[Value]> {
    match v {
        Value::Tuple(t) => Ok(&t.0),
        other => bail!("expected a tuple of arguments, found {}", other.type_name()),
    }
}

fn as_u64(v: &Value, what: &str) -> Result<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        Value::Int(i) => bail!("{what} is negative ({i})"),
        other => bail!("{what} must be an int, found {}", other.type_name()),
    }
}

fn as_u64_tuple(v: &Value, what: &str) -> Result<Vec<u64>> {
    let items = match v {
        Value::Tuple(t) => &t.0,
        other => bail!("{what} must be a tuple, found {}", other.type_name()),
    };
    items.iter().map(|x| as_u64(x, what)).collect()
}

/// Applies a whitelisted callable (REDUCE / NEWOBJ).
fn call(func: &Value, args: &Value) -> Result<Value> {
    let g = match func {
        Value::Global(g) => *g,
        other => bail!("cannot call a {}", other.type_name()),
    };
    let args = tuple_items(args)?;
    match g {
        Global::OrderedDict => {
            let mut dict = Dict::default();
            match args {
                [] => {}
                [Value::List(items)] => {
                    for pair in &items.borrow().0 {
                        match tuple_items(pair)? {
                            [k, v] => dict.insert(k.clone(), v.clone())?,
                            _ => bail!("OrderedDict items must be (key, value) pairs"),
                        }
                    }
                }
                _ => bail!("unsupported OrderedDict arguments"),
            }
            Ok(Value::new_dict(dict))
        }
        Global::RebuildTensorV2 | Global::RebuildTensor => {
            let min = if g == Global::RebuildTensor { 4 } else { 6 };
            ensure!(
                args.len() >= min && args.len() <= 7,
                "tensor rebuild expects {min} to 7 arguments, got {}",
                args.len()
            );
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => bail!(
                    "tensor storage must be a storage, found {}",
                    other.type_name()
                ),
            };
            let offset = as_u64(&args[1], "storage offset")?;
            let size = as_u64_tuple(&args[2], "tensor size")?;
            let stride = as_u64_tuple(&args[3], "tensor stride")?;
            ensure!(
                size.len() == stride.len(),
                "tensor size {:?} and stride {:?} have different lengths",
                size,
                stride
            );
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage,
                offset,
                size,
                stride,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => bail!("parameter data must be a tensor"),
        },
        Global::TorchSize => match args {
            [t @ Value::Tuple(_)] => {
                as_u64_tuple(t, "torch.Size")?;
                Ok(t.clone())
            }
            _ => bail!("unsupported torch.Size arguments"),
        },
        Global::TorchDevice => Ok(Value::Opaque("torch.device")),
        Global::CodecsEncode => match args {
            [Value::Str(s), Value::Str(enc)] => {
                let bytes: Vec<u8> = match enc.to_ascii_lowercase().as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => s
                        .chars()
                        .map(|c| u8::try_from(u32::from(c)).context("character outside latin-1"))
                        .collect::<Result<_>>()?,
                    "utf-8" | "utf8" => s.as_bytes().to_vec(),
                    other => bail!("unsupported encoding '{other}'"),
                };
                Ok(Value::Bytes(Rc::from(bytes)))
            }
            _ => bail!("unsupported _codecs.encode arguments"),
        },
        Global::Set => match args {
            [] => Ok(Value::new_list(Vec::new())),
            [Value::List(l)] => Ok(Value::new_list(l.borrow().0.clone())),
            [Value::Tuple(t)] => Ok(Value::new_list(t.0.clone())),
            _ => bail!("unsupported set arguments"),
        },
        Global::Storage(_) | Global::TorchDtype => bail!("this global cannot be called"),
    }
}

/// BUILD: only state on dicts (an OrderedDict's `_metadata`) and empty state on tensors are accepted.
fn build(obj: &Value, state: &Value) -> Result<()> {
    match (obj, state) {
        (Value::Dict(_), _) => Ok(()),
        (Value::Tensor(_), Value::None) => Ok(()),
        (Value::Tensor(_), Value::Dict(d)) if d.borrow().entries.is_empty() => Ok(()),
        (Value::Tensor(_), Value::Tuple(t)) if t.0.is_empty() => Ok(()),
        (o, s) => bail!(
            "setting state ({}) on a {} is not supported",
            s.type_name(),
            o.type_name()
        ),
    }
}

/// Resolves a persistent id `('storage', StorageType, key, location, numel)`.
fn persistent_load(pid: &Value) -> Result<Value> {
    let items = match pid {
        Value::Tuple(t) => &t.0,
        other => bail!("unsupported persistent id of type {}", other.type_name()),
    };
    match items.as_slice() {
        [Value::Str(tag), ty, Value::Str(key), Value::Str(location), numel]
            if &**tag == "storage" =>
        {
            let dtype = match ty {
                Value::Global(Global::Storage(d)) => *d,
                other => bail!("unsupported storage type ({})", other.type_name()),
            };
            let numel = as_u64(numel, "storage size")?;
            Ok(Value::Storage(Rc::new(StorageRef {
                key: key.to_string(),
                dtype,
                location: location.to_string(),
                numel,
            })))
        }
        _ => bail!("unsupported persistent id (expected ('storage', type, key, location, numel))"),
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// What the writer needs to know about one tensor of a state dict.
pub(crate) struct TensorEntry<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Storage record key (`<dir>/data/<key>`).
    pub key: String,
}

/// The torch storage class name for a dtype.
pub(crate) fn storage_class(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
    }
}

/// Row-major contiguous strides, computed like torch (sizes of 0 count as 1).
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<u64> {
    let mut strides = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for (s, &dim) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul((dim as u64).max(1));
    }
    strides
}

/// Emits protocol-2 opcodes with Python's memoization behaviour.
struct Writer {
    out: Vec<u8>,
    memo_len: u32,
    globals: HashMap<(&'static str, &'static str), u32>,
    strings: HashMap<String, u32>,
}

impl Writer {
    fn put(&mut self) {
        let idx = self.memo_len;
        self.memo_len += 1;
        match u8::try_from(idx) {
            Ok(i) => self.out.extend_from_slice(&[b'q', i]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
        }
    }

    fn get(&mut self, idx: u32) {
        match u8::try_from(idx) {
            Ok(i) => self.out.extend_from_slice(&[b'h', i]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
        }
    }

    fn global(&mut self, module: &'static str, name: &'static str) {
        if let Some(&idx) = self.globals.get(&(module, name)) {
            self.get(idx);
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        self.globals.insert((module, name), self.memo_len);
        self.put();
    }

    /// A fresh string object (memoized but never looked up again).
    fn new_str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }

    /// A string that is the same Python object at every use ('storage', 'cpu', a storage key).
    fn shared_str(&mut self, s: &str) {
        if let Some(&idx) = self.strings.get(s) {
            self.get(idx);
            return;
        }
        self.strings.insert(s.to_string(), self.memo_len);
        self.new_str(s);
    }

    fn int(&mut self, v: u64) {
        if v <= 0xff {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v <= 0xffff {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= 0x7fff_ffff {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement, (bit_length >> 3) + 1 bytes.
            let bits = 64 - v.leading_zeros() as usize;
            let n = (bits >> 3) + 1;
            self.out.extend_from_slice(&[0x8a, n as u8]);
            let bytes = v.to_le_bytes();
            for i in 0..n {
                self.out.push(bytes.get(i).copied().unwrap_or(0));
            }
        }
    }

    fn int_tuple(&mut self, values: &[u64]) {
        match values.len() {
            0 => self.out.push(b')'),
            n @ 1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.out.push(0x84 + n as u8);
                self.put();
            }
            _ => {
                self.out.push(b'(');
                for &v in values {
                    self.int(v);
                }
                self.out.push(b't');
                self.put();
            }
        }
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
        self.put();
    }

    fn tensor(&mut self, t: &TensorEntry<'_>, location: &str) {
        let numel = t
            .shape
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // Persistent id: ('storage', torch.XStorage, key, location, numel)
        self.out.push(b'(');
        self.shared_str("storage");
        self.global("torch", storage_class(t.dtype));
        self.shared_str(&t.key);
        self.shared_str(location);
        self.int(numel);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(0); // storage offset
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        self.int_tuple(&shape);
        self.int_tuple(&contiguous_strides(t.shape));
        self.out.push(0x89); // requires_grad = False
        self.empty_ordered_dict(); // backward hooks
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// Pickles `OrderedDict(name -> tensor)` exactly like `torch.save` does (protocol 2).
pub(crate) fn write_state_dict(tensors: &[TensorEntry<'_>], location: &str) -> Vec<u8> {
    let mut w = Writer {
        out: vec![0x80, 2],
        memo_len: 0,
        globals: HashMap::new(),
        strings: HashMap::new(),
    };
    w.empty_ordered_dict();
    // Python's pickler emits dict items in batches of 1000.
    for batch in tensors.chunks(1000) {
        if batch.len() > 1 {
            w.out.push(b'(');
        }
        for t in batch {
            w.new_str(t.name);
            w.tensor(t, location);
        }
        w.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    w.out.push(b'.');
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict_entries(v: &Value) -> Vec<(String, Value)> {
        match v {
            Value::Dict(d) => d
                .borrow()
                .entries()
                .iter()
                .map(|(k, v)| match k {
                    Value::Str(s) => (s.to_string(), v.clone()),
                    _ => panic!("non-string key"),
                })
                .collect(),
            other => panic!("not a dict: {}", other.type_name()),
        }
    }

    #[test]
    fn writer_output_round_trips() {
        let shapes: Vec<Vec<usize>> = vec![
            vec![],
            vec![3],
            vec![2, 3],
            vec![2, 0, 4],
            vec![1, 2, 3, 4, 5],
        ];
        let names: Vec<String> = (0..shapes.len())
            .map(|i| format!("layer{i}.weight"))
            .collect();
        let entries: Vec<TensorEntry> = shapes
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(i, (s, n))| TensorEntry {
                name: n,
                dtype: if i % 2 == 0 { DType::F32 } else { DType::I64 },
                shape: s,
                key: i.to_string(),
            })
            .collect();
        let bytes = write_state_dict(&entries, "cuda:1");
        let root = unpickle(&bytes).expect("unpickle");
        let items = dict_entries(&root);
        assert_eq!(items.len(), shapes.len());
        for (i, ((name, v), shape)) in items.iter().zip(&shapes).enumerate() {
            assert_eq!(name, &names[i]);
            let Value::Tensor(t) = v else {
                panic!("not a tensor")
            };
            assert_eq!(t.size, shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
            assert_eq!(t.stride, contiguous_strides(shape));
            assert_eq!(t.offset, 0);
            assert_eq!(t.storage.key, i.to_string());
            assert_eq!(t.storage.location, "cuda:1");
            assert_eq!(t.storage.numel, shape.iter().product::<usize>() as u64);
        }
    }

    #[test]
    fn many_entries_use_long_memo_and_batches() {
        let names: Vec<String> = (0..2500).map(|i| format!("t{i}")).collect();
        let shape = [2usize, 3];
        let entries: Vec<TensorEntry> = names
            .iter()
            .enumerate()
            .map(|(i, n)| TensorEntry {
                name: n,
                dtype: DType::F16,
                shape: &shape,
                key: i.to_string(),
            })
            .collect();
        let bytes = write_state_dict(&entries, "cpu");
        assert!(bytes.contains(&b'r') && bytes.contains(&b'j'));
        let root = unpickle(&bytes).expect("unpickle");
        let items = dict_entries(&root);
        assert_eq!(items.len(), 2500);
        assert_eq!(items[1234].0, "t1234");
    }

    #[test]
    fn large_ints_use_long1() {
        let mut w = Writer {
            out: Vec::new(),
            memo_len: 0,
            globals: HashMap::new(),
            strings: HashMap::new(),
        };
        w.int(0x8000_0000);
        assert_eq!(w.out, [0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert!(matches!(decode_long(&w.out[2..]), Value::Int(0x8000_0000)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0; 9]), Value::Int(0)));
        assert!(matches!(
            decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 1]),
            Value::BigInt
        ));
    }

    #[test]
    fn rejects_unknown_globals_and_opcodes() {
        let err = unpickle(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("os.system"), "{msg}");
        let err = unpickle(b"\x80\x02c__torch__.Net\nNet\n.").unwrap_err();
        assert!(format!("{err:#}").contains("TorchScript class"));
        let err = unpickle(b"\x80\x02i").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("INST") && msg.contains("0x69"), "{msg}");
        let err = unpickle(b"\x80\x02\xff").unwrap_err();
        assert!(format!("{err:#}").contains("0xff"));
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        let names = ["a".to_string(), "b".to_string()];
        let shape = [4usize];
        let entries: Vec<TensorEntry> = names
            .iter()
            .map(|n| TensorEntry {
                name: n,
                dtype: DType::U8,
                shape: &shape,
                key: n.clone(),
            })
            .collect();
        let bytes = write_state_dict(&entries, "cpu");
        for cut in 0..bytes.len() {
            assert!(unpickle(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for bad in [
            &b"."[..],
            b"0",
            b"(t0.",
            b"h\x05.",
            b"}K\x01s.",
            b"K\x01K\x02s.",
            b"]K\x01u.",
        ] {
            assert!(unpickle(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn basic_values_and_memo() {
        // {'a': [1, -2, 3.5, None, True], 'b': (b'xy', 'a')}, with a memo reference.
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'q', 1, b']', b'(',
        ];
        p.extend_from_slice(&[b'K', 1, b'J']);
        p.extend_from_slice(&(-2i32).to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&3.5f64.to_be_bytes());
        p.extend_from_slice(&[
            b'N', 0x88, b'e', 0x8c, 1, b'b', b'C', 2, b'x', b'y', b'h', 1, 0x86, b'u', b'.',
        ]);
        let root = unpickle(&p).expect("unpickle");
        let items = dict_entries(&root);
        assert_eq!(items.len(), 2);
        let Value::List(l) = &items[0].1 else {
            panic!()
        };
        let l = l.borrow();
        assert!(matches!(l.0[0], Value::Int(1)));
        assert!(matches!(l.0[1], Value::Int(-2)));
        assert!(matches!(l.0[2], Value::Float(f) if f == 3.5));
        assert!(matches!(l.0[3], Value::None));
        assert!(matches!(l.0[4], Value::Bool(true)));
        let Value::Tuple(t) = &items[1].1 else {
            panic!()
        };
        assert!(matches!(&t.0[0], Value::Bytes(b) if &b[..] == b"xy"));
        assert!(matches!(&t.0[1], Value::Str(s) if &**s == "a"));
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let depth = 1_000_000;
        // Nested 1-tuples: ((((),),),)
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85u8, depth));
        p.push(b'.');
        let v = unpickle(&p).expect("tuples");
        drop(v);
        // Nested lists: push `depth` lists, then APPEND each into the one below it.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', depth));
        p.extend(std::iter::repeat_n(b'a', depth - 1));
        p.push(b'.');
        let v = unpickle(&p).expect("lists");
        drop(v);
        // A deeply nested tuple as a dict key is refused, not recursed into.
        let mut p = vec![0x80, 2, b'}', b')'];
        p.extend(std::iter::repeat_n(0x85u8, 10_000));
        p.extend_from_slice(b"K\x01s.");
        assert!(unpickle(&p).is_err());
    }

    #[test]
    fn self_referencing_list_is_harmless() {
        // l = []; l.append(l)
        let v = unpickle(b"\x80\x02]q\x00h\x00a.").expect("unpickle");
        assert_eq!(v.type_name(), "list");
    }
}
