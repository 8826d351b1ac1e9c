//! The library's error type. Every variant names what was being read or written, so the binaries
//! can print it as it is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error("tensor {tensor}: {msg}")]
    BadTensor { tensor: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// A CUDA driver or NVRTC call failed; the message names the operation.
    #[error("GPU: {0}")]
    Gpu(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), msg: msg.into() }
    }
    pub fn bad_tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::BadTensor { tensor: tensor.into(), msg: msg.into() }
    }
}

/// Attach a path to an I/O result.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
