//! What a kubelet credential provider plugin, or its configuration, hands fixity: the plugin's
//! `CredentialProviderResponse` for an image, the `CredentialProviderConfig` file, and an image
//! pattern (`matchImages` entries and `auth` keys) against an image. The first byte chooses;
//! the image and the answer, or the pattern and the image, are separated by a NUL.
//!
//! Properties: a credential is given only for an image that an `auth` key of the answer
//! matches, and it is the entry of the most specific such key (the greatest); a configured
//! plugin lies directly in the plugin directory, named as its provider, whatever the name;
//! a pattern without globs, scheme, query or user part matches the image it spells.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use fixity::verify::credentials::image_match::ImagePattern;
use fixity::verify::credentials::provider_config::Provider;
use fixity::verify::fuzzing;
use libfuzzer_sys::fuzz_target;

/// The part of an answer the property judges, read as a plain map of entries.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    auth: BTreeMap<String, Entry>,
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

fn split_nul(data: &[u8]) -> Option<(&str, &[u8])> {
    let at = data.iter().position(|&b| b == 0)?;
    Some((std::str::from_utf8(&data[..at]).ok()?, &data[at + 1..]))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Some((image, out)) = split_nul(rest) else {
                return;
            };
            let provider = Provider {
                name: "fuzz".into(),
                program: "/nonexistent/fuzz".into(),
                match_images: Vec::new(),
                default_cache_duration: Duration::from_secs(60),
                args: Vec::new(),
                env: Vec::new(),
            };
            let Ok(Some((username, password))) =
                fuzzing::credential_provider_answer(provider, out, image)
            else {
                return;
            };
            let answer: Answer =
                serde_json::from_slice(out).expect("an accepted answer reads as entries");
            let matching: Vec<(String, &Entry)> = answer
                .auth
                .iter()
                .filter(|(_, e)| !(e.username.is_empty() && e.password.is_empty()))
                .filter_map(|(key, e)| {
                    let pattern = ImagePattern::parse(key).ok()?;
                    pattern
                        .matches(image)
                        .then(|| (pattern.as_str().to_owned(), e))
                })
                .collect();
            let greatest = matching.iter().map(|(key, _)| key).max();
            assert!(
                matching.iter().any(|(key, e)| Some(key) == greatest
                    && e.username == username
                    && e.password == password),
                "{image:?} was given {username:?}, which no most specific matching key holds"
            );
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let dir = Path::new("/plugins");
            let Ok(providers) = fuzzing::credential_provider_config(text, dir) else {
                return;
            };
            for p in providers {
                assert_eq!(p.program.parent(), Some(dir), "{:?}", p.name);
                assert_eq!(p.program.file_name(), Some(OsStr::new(&p.name)));
            }
        }
        _ => {
            let Some((pattern, image)) = split_nul(rest) else {
                return;
            };
            let Ok(parsed) = ImagePattern::parse(pattern) else {
                return;
            };
            if let Ok(image) = std::str::from_utf8(image) {
                let _ = parsed.matches(image);
            }
            let plain = pattern == pattern.trim()
                && !pattern.contains(['*', '?', '[', '\\', '#', '@'])
                && !pattern.contains("://");
            if plain {
                assert!(parsed.matches(pattern), "{pattern:?} does not match itself");
            }
        }
    }
});
