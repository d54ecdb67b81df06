//! A GGUF file's header: moac's own reader, which checks every count, length and offset
//! against the size of the file before it allocates or seeks (a corrupt or hostile file
//! gives an error naming the file and the item, never a huge allocation or a panic), and
//! hands the result over as candle-core's [`Content`] (so candle reads the tensor data,
//! whose extent is then known to lie inside the file). Typed accessors name the file and
//! the key in their errors.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The most values (array elements included) the metadata may hold: real files carry a
/// few hundred thousand (vocabulary, merges, token types); this bounds the memory a
/// file of tiny values can make the reader allocate.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;
/// The longest string (a key, a token, a chat template) the reader takes.
pub const MAX_STRING_BYTES: u64 = 1 << 26;
/// How deeply arrays may nest (real files nest none).
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// The metadata of a GGUF file (the tensors stay on disk until loaded).
pub struct GgufMetadata {
    path: PathBuf,
    content: Content,
}

impl GgufMetadata {
    /// Reads and checks the header and metadata of `path`: after this, every tensor of
    /// [`content`](Self::content) has a known type and lies inside the file.
    pub fn read(path: &Path) -> Result<GgufMetadata> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let content = parse(path, std::io::BufReader::new(file), len)?;
        Ok(GgufMetadata {
            path: path.to_path_buf(),
            content,
        })
    }

    /// Parses a GGUF file held in memory (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<GgufMetadata> {
        let content = parse(path, bytes, bytes.len() as u64)?;
        Ok(GgufMetadata {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The candle content (tensor infos and metadata).
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn need(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        match self.need(key)? {
            Value::String(s) => Ok(s.as_str()),
            other => Err(self.err(key, format!("expected a string, found {}", describe(other)))),
        }
    }

    /// An unsigned integer below 2^32 (stored as any integer type).
    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.need(key)?;
        integer(v)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "expected an integer from 0 to {}, found {}",
                        u32::MAX,
                        describe(v)
                    ),
                )
            })
    }

    /// Like [`u32`](Self::u32), `None` when the key is absent (a present value of the
    /// wrong type is an error, not a default).
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u32(key).map(Some),
        }
    }

    /// A float (f32 or f64), `None` when the key is absent.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) if x.is_finite() => Ok(Some(*x)),
            Some(Value::F64(x)) if x.is_finite() => Ok(Some(*x as f32)),
            Some(other) => Err(self.err(
                key,
                format!("expected a finite float, found {}", describe(other)),
            )),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.need(key)? {
            Value::Array(values) => Ok(values),
            other => Err(self.err(key, format!("expected an array, found {}", describe(other)))),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.err(
                    key,
                    format!("element {i}: expected a string, found {}", describe(other)),
                )),
            })
            .collect()
    }

    /// An array of integers (any integer type GGUF stores).
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                integer(v)
                    .and_then(|x| i64::try_from(x).ok())
                    .ok_or_else(|| {
                        self.err(
                            key,
                            format!("element {i}: expected an integer, found {}", describe(v)),
                        )
                    })
            })
            .collect()
    }
}

/// The value of an integer of any GGUF integer type.
fn integer(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

/// A metadata value for an error message: its type, and the value when short.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(s) => format!("a string of {} bytes", s.len()),
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::Bool(b) => format!("the bool {b}"),
        Value::F32(x) => format!("the f32 {x}"),
        Value::F64(x) => format!("the f64 {x}"),
        other => match integer(other) {
            Some(i) => format!("the {} {i}", type_name(other)),
            None => format!("{other:?}"),
        },
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// GGML's tensor type ids, for messages about the ones moac does not read.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "a removed Q4_2/Q4_3",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The candle type of a GGML type id (those candle has).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Reads a GGUF header from `r`, a stream of `len` bytes, checking everything against
/// `len` before it is allocated or trusted.
struct Parser<'a, R> {
    path: &'a Path,
    r: R,
    pos: u64,
    len: u64,
    /// Version 1 stores counts and lengths as u32, later versions as u64.
    v1: bool,
    /// Metadata values read so far (array elements included).
    values: u64,
}

impl<R: Read> Parser<'_, R> {
    fn format(&self, message: impl std::fmt::Display) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            message: format!("not a readable GGUF file: {message}"),
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// `n` bytes for `what`, if the file still holds them.
    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        if n > self.left() {
            return Err(self.format(format!(
                "truncated: {} needs {n} bytes at offset {}, the file has {} bytes",
                what(),
                self.pos,
                self.len
            )));
        }
        // n <= len - pos, and len fits in memory's address space for the in-memory
        // reader; for a file it is at most the file's size.
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length: u32 in version 1, u64 after.
    fn count(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        if self.v1 {
            Ok(self.u32(what)? as u64)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.count(&|| format!("the length of {}", what()))?;
        if n > MAX_STRING_BYTES && n <= self.left() {
            return Err(self.format(format!(
                "{}: a string of {n} bytes (moac reads strings up to {MAX_STRING_BYTES})",
                what()
            )));
        }
        let mut bytes = self.bytes(n, what)?;
        // Writers sometimes end strings with NULs; GGUF strings have none.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The size of the smallest value of type `t` (to bound array lengths).
    fn min_size(&self, t: u32) -> u64 {
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            // A string: its length; an array: its type and length.
            8 => {
                if self.v1 {
                    4
                } else {
                    8
                }
            }
            _ => {
                if self.v1 {
                    8
                } else {
                    12
                }
            }
        }
    }

    fn value(&mut self, t: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.format(format!(
                "{}: the metadata holds more than {MAX_METADATA_VALUES} values",
                what()
            )));
        }
        Ok(match t {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.format(format!("{}: bool byte {b} (not 0 or 1)", what()))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.format(format!(
                        "{}: arrays nested more than {MAX_ARRAY_DEPTH} deep",
                        what()
                    )));
                }
                let et = self.u32(&|| format!("the element type of {}", what()))?;
                if et > 12 {
                    return Err(self.format(format!("{}: unknown array element type {et}", what())));
                }
                let n = self.count(&|| format!("the length of {}", what()))?;
                let room = self.left() / self.min_size(et);
                if n > room {
                    return Err(self.format(format!(
                        "{}: an array of {n} values cannot fit in the {} bytes left of the file (truncated, or a wrong length)",
                        what(),
                        self.left()
                    )));
                }
                let mut values = Vec::new();
                for i in 0..n {
                    values
                        .push(self.value(et, depth + 1, &|| format!("element {i} of {}", what()))?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            _ => return Err(self.format(format!("{}: unknown value type {t}", what()))),
        })
    }
}

fn parse<R: Read>(path: &Path, r: R, len: u64) -> Result<Content> {
    let mut p = Parser {
        path,
        r,
        pos: 0,
        len,
        v1: false,
        values: 0,
    };
    if len == 0 {
        return Err(p.format("the file is empty"));
    }
    if len < 4 {
        return Err(p.format(format!(
            "truncated: {len} bytes, shorter than the GGUF magic"
        )));
    }
    let magic = p.array::<4>(&|| "the magic".into())?;
    if &magic != b"GGUF" {
        return Err(p.format(format!(
            "wrong magic {:02x} {:02x} {:02x} {:02x} ({:?}), a GGUF file starts with \"GGUF\"",
            magic[0],
            magic[1],
            magic[2],
            magic[3],
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = p.u32(&|| "the version".into())?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => {
            return Err(p.format(format!(
                "unsupported GGUF version {v} (moac reads versions 1 to 3)"
            )))
        }
    };
    p.v1 = version == 1;
    let tensor_count = p.count(&|| "the tensor count".into())?;
    let kv_count = p.count(&|| "the metadata count".into())?;
    // Every metadata entry takes at least a key length, a type and one byte; every
    // tensor entry a name length, a dimension count, a type and an offset.
    let (kv_min, tensor_min) = if p.v1 { (9, 20) } else { (13, 24) };
    let room = p.left();
    if kv_count > room / kv_min {
        return Err(p.format(format!(
            "metadata count {kv_count} is absurd or the file truncated: the {room} bytes left hold at most {}",
            room / kv_min
        )));
    }
    if tensor_count > room / tensor_min {
        return Err(p.format(format!(
            "tensor count {tensor_count} is absurd or the file truncated: the {room} bytes left hold at most {}",
            room / tensor_min
        )));
    }
    let mut metadata = HashMap::new();
    for i in 0..kv_count {
        let key = p.string(&|| format!("the key of metadata entry {i}"))?;
        let t = p.u32(&|| format!("the type of metadata {key}"))?;
        let value = p.value(t, 0, &|| format!("metadata {key}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(p.format(format!("metadata {key} appears twice")));
        }
    }
    let mut tensors: Vec<(String, TensorInfo, u64)> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for i in 0..tensor_count {
        let name = p.string(&|| format!("the name of tensor {i}"))?;
        let nd = p.u32(&|| format!("the dimension count of tensor {name}"))?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(p.format(format!(
                "tensor {name} has {nd} dimensions (GGML tensors have 1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::new();
        for d in 0..nd {
            let what = || format!("dimension {d} of tensor {name}");
            let n = p.count(&what)?;
            if n == 0 {
                return Err(p.format(format!("tensor {name}: dimension {d} is 0")));
            }
            dims.push(usize::try_from(n).map_err(|_| {
                p.format(format!("tensor {name}: dimension {d} is {n}, too large"))
            })?);
        }
        // GGUF stores the innermost dimension first; a shape lists the outermost first.
        dims.reverse();
        let type_id = p.u32(&|| format!("the type of tensor {name}"))?;
        let Some(dtype) = ggml_dtype(type_id) else {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {name} has GGML type {type_id} ({}), which moac does not read",
                    ggml_type_name(type_id)
                ),
            });
        };
        let offset = p.u64(&|| format!("the offset of tensor {name}"))?;
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                p.format(format!(
                    "tensor {name}: shape {dims:?} has more elements than memory can index"
                ))
            })?;
        let block = dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(p.format(format!(
                "tensor {name}: shape {dims:?} ({elems} elements) is not a whole number of {dtype:?} blocks of {block}"
            )));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size())
            .ok_or_else(|| p.format(format!("tensor {name}: shape {dims:?} is too large")))?;
        if !names.insert(name.clone()) {
            return Err(p.format(format!("tensor {name} appears twice")));
        }
        tensors.push((
            name,
            TensorInfo {
                ggml_dtype: dtype,
                shape: candle_core::Shape::from(dims),
                offset,
            },
            size as u64,
        ));
    }
    let alignment = match metadata.get("general.alignment") {
        None => candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT,
        Some(v) => match integer(v) {
            Some(a) if a > 0 && a <= 1 << 20 && (a as u64).is_power_of_two() => a as u64,
            _ => {
                return Err(Error::Metadata {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    message: format!("expected a power of two up to 2^20, found {}", describe(v)),
                })
            }
        },
    };
    // pos <= len, and alignment is at most 2^20: no overflow.
    let data_offset = p.pos.div_ceil(alignment) * alignment;
    for (name, info, size) in &tensors {
        let end = data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(*size));
        if end.is_none_or(|e| e > len) {
            return Err(p.format(format!(
                "tensor {name} ({:?}, shape {:?}, {size} bytes at data offset {}) runs past the end of the file ({len} bytes): truncated, or a wrong offset or shape",
                info.ggml_dtype,
                info.shape.dims(),
                info.offset
            )));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos: tensors
            .into_iter()
            .map(|(name, info, _)| (name, info))
            .collect(),
        tensor_data_offset: data_offset,
    })
}
