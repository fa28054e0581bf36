//! The error type of the LoRA crate.

/// Everything that can go wrong while configuring, loading, saving or merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A tensor has a shape that does not fit the layer it is meant for.
    #[error("tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's key.
        key: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape that was found.
        found: Vec<usize>,
    },
}
