//! Entry points for the fuzz targets in `fuzz/` (compiled only under `cargo fuzz`, which sets
//! `cfg(fuzzing)`): what a registry or a credential provider answers, read exactly as a
//! verification reads it, without the network or the plugin's process in between.

use std::path::Path;

use oci_client::manifest::OciDescriptor;

use super::Authority;
use super::check::{CompiledAuthority, first_accepted};
use super::credentials::provider_config::{self, Provider};
use super::credentials::providers;
use super::discover::plausible_layer;
use super::evidence::{sigstore_bundle, simple_signing};
use super::registry::{
    Challenge, Fetched, parse_index, read_challenges, read_manifest, read_token,
};

/// What reading one registry answer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Usable, with this many entries (layers, manifests, challenge parameters).
    Found(usize),
    Refused(String),
}

fn found<T>(fetched: Fetched<T>, count: impl Fn(&T) -> usize) -> Read {
    match fetched {
        Fetched::Found(t) => Read::Found(count(&t)),
        Fetched::NotFound => Read::Refused("not found".to_owned()),
        Fetched::Refused(why) | Fetched::Unavailable(why) => Read::Refused(why),
    }
}

/// A signature manifest (`sha256-<hex>.sig`); found layers are those that pass the checks a
/// layer gets before it is fetched.
pub fn signature_manifest(body: &[u8]) -> Read {
    match read_manifest(body, "signature manifest", "sha256-0.sig") {
        Fetched::Found(m) => Read::Found(
            m.layers
                .iter()
                .filter(|l| plausible_layer(l).is_ok())
                .count(),
        ),
        other => found(other, |_| 0),
    }
}

/// A referrers list, or the referrers tag.
pub fn referrers(body: &[u8]) -> Read {
    found(parse_index(body, "referrers list"), |i| i.manifests.len())
}

/// A token service's answer; the header it yields.
pub fn token(body: &[u8]) -> Result<String, String> {
    read_token(body).map(|(header, _)| header)
}

/// The `WWW-Authenticate` values of a 401.
pub fn challenges(values: &[&str]) -> Read {
    match read_challenges(values) {
        Ok(Challenge::Bearer(params)) => Read::Found(params.len()),
        Ok(Challenge::Basic) => Read::Found(0),
        Err(why) => Read::Refused(why),
    }
}

/// Signatures found in a registry, not yet trusted.
pub enum Found<'a> {
    /// A classic signature layer: its descriptor (annotations included, as JSON) and blob.
    Layer {
        descriptor: &'a [u8],
        blob: &'a [u8],
    },
    /// A Sigstore bundle from a referrer.
    Bundle(&'a [u8]),
}

/// Whether any authority accepts what was found as a signature of `digest`; a compile failure
/// of an authority is an error.
pub fn accepted(found: Found<'_>, digest: &str, authorities: &[Authority]) -> Result<bool, String> {
    let compiled = authorities
        .iter()
        .map(CompiledAuthority::compile)
        .collect::<Result<Vec<_>, _>>()?;
    let evidence = match found {
        Found::Layer { descriptor, blob } => serde_json::from_slice::<OciDescriptor>(descriptor)
            .map_err(|e| e.to_string())
            .and_then(|layer| {
                plausible_layer(&layer)?;
                let annotations = layer.annotations.unwrap_or_default();
                simple_signing(&annotations, blob.to_vec(), "fuzz")
            }),
        Found::Bundle(bytes) => sigstore_bundle(bytes, "fuzz"),
    };
    let mut tried = Vec::new();
    Ok(first_accepted(&[evidence], digest, authorities, &compiled, &mut tried).is_some())
}

/// A kubelet `CredentialProviderConfig`, read as `--image-credential-provider-config` is (the
/// plugins in `bin_dir` are not looked for).
pub fn credential_provider_config(text: &str, bin_dir: &Path) -> Result<Vec<Provider>, String> {
    provider_config::read(text, bin_dir)
}

/// A credential provider plugin's output, read, cached and looked up for `image` as a check
/// does: the user and password it gives for the image, if any.
pub fn credential_provider_answer(
    provider: Provider,
    out: &[u8],
    image: &str,
) -> Result<Option<(String, String)>, String> {
    providers::read_answer(provider, out, image)
}
