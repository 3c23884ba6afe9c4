//! Image references, parsed the way container runtimes resolve them.

mod reference;

pub use reference::{Digest, DigestAlgorithm, ImageReference, ReferenceError, canonical_registry};
