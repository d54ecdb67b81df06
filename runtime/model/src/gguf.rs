//! A GGUF file's metadata (candle-core's reader), with typed accessors whose errors name
//! the file and the key.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::{Path, PathBuf};

/// The metadata of a GGUF file (the tensors stay on disk until loaded).
pub struct GgufMetadata {
    path: PathBuf,
    content: Content,
}

impl GgufMetadata {
    /// Reads the header and metadata of `path`.
    pub fn read(path: &Path) -> Result<GgufMetadata> {
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
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
        self.need(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.err(key, e.to_string()))
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        self.need(key)?
            .to_u32()
            .map_err(|e| self.err(key, e.to_string()))
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let values = self
            .need(key)?
            .to_vec()
            .map_err(|e| self.err(key, e.to_string()))?;
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .map(|s| s.as_str())
                    .map_err(|e| self.err(key, e.to_string()))
            })
            .collect()
    }

    /// An array of integers (any integer type GGUF stores).
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let values = self
            .need(key)?
            .to_vec()
            .map_err(|e| self.err(key, e.to_string()))?;
        values
            .iter()
            .map(|v| match v {
                Value::I8(x) => Ok(*x as i64),
                Value::U8(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U64(x) => Ok(*x as i64),
                other => Err(self.err(key, format!("not an integer: {other:?}"))),
            })
            .collect()
    }
}
