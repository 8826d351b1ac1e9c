//! SentencePiece BPE tokenizer (in progress).

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Malformed(String),
}
