//! Conversion pipeline.
