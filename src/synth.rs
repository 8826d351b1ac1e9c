//! Synthetic Grok-architecture checkpoints (in progress).
