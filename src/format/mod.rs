//! The chunked on-disk format.
