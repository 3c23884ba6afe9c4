//! Signatures as a registry holds them: a classic signature layer (its descriptor, then a NUL,
//! then the simple-signing blob) or a Sigstore bundle from a referrer. The first byte chooses.
//!
//! Property: nothing made of fuzz bytes is accepted as a signature, by a key authority whose
//! private half signed nothing or by a keyless authority under the public-good root.
#![no_main]

use std::sync::OnceLock;

use fixity::verify::fuzzing::{self, Found};
use fixity::verify::{Authority, KeyRequirements, KeylessRequirements, Matcher, TrustRoot};
use libfuzzer_sys::fuzz_target;

const DIGEST: &str = "sha256:8d9c4c0b6c5e1d1c4a3a7f1f0e8a6b9c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f0a";

fn authorities() -> &'static [Authority] {
    static A: OnceLock<Vec<Authority>> = OnceLock::new();
    A.get_or_init(|| {
        vec![
            Authority::Key {
                public_key_pem: fixity_fuzz::KEY.to_owned(),
                requirements: KeyRequirements::default(),
            },
            Authority::Keyless {
                issuer: Matcher::Exact("https://token.actions.githubusercontent.com".to_owned()),
                subject: Matcher::Regex(
                    regex::Regex::new("^https://github.com/acme/.*$").expect("regex"),
                ),
                requirements: KeylessRequirements::default(),
                trust_root: TrustRoot::PublicGood,
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let found = if which % 2 == 0 {
        let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Found::Layer {
            descriptor: &rest[..split],
            blob: rest.get(split + 1..).unwrap_or_default(),
        }
    } else {
        Found::Bundle(rest)
    };
    let accepted = fuzzing::accepted(found, DIGEST, authorities());
    assert_eq!(
        accepted,
        Ok(false),
        "fuzz bytes were accepted as a signature"
    );
});
