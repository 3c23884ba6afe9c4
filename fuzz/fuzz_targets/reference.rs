//! Image references as a pod spec writes them.
//!
//! Properties: a reference the parser accepts re-parses from its canonical form to the same
//! parts (the implied `:latest` spelled out); its name is `registry/repository`; the registry
//! is already canonical (no Docker Hub alias, no default port); a digest it holds parses on
//! its own to the same digest.
#![no_main]

use fixity::image::{Digest, ImageReference, canonical_registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(reference) = ImageReference::parse(text) else {
        return;
    };
    let canonical = reference.to_string();
    let again = ImageReference::parse(&canonical)
        .unwrap_or_else(|e| panic!("{text:?} parsed, its canonical form {canonical:?} not: {e}"));
    assert_eq!(again.registry(), reference.registry(), "{text:?}");
    assert_eq!(again.repository(), reference.repository(), "{text:?}");
    // The canonical form spells out the tag a runtime pulls when none is given.
    let pulled = match (reference.tag(), reference.digest()) {
        (None, None) => Some("latest"),
        (tag, _) => tag,
    };
    assert_eq!(again.tag(), pulled, "{text:?}");
    assert_eq!(again.digest(), reference.digest(), "{text:?}");
    assert_eq!(again.to_string(), canonical, "{text:?}");
    assert_eq!(
        reference.name(),
        format!("{}/{}", reference.registry(), reference.repository())
    );
    assert_eq!(
        canonical_registry(reference.registry()),
        reference.registry()
    );
    if let Some(digest) = reference.digest() {
        let text = digest.to_string();
        assert_eq!(Digest::parse(&text).ok(), Some(digest));
    }
});
