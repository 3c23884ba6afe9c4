//! The verification half of the sigstore-conformance client protocol, over fixity's verifier,
//! so that the public conformance suite can be run against fixity by hand (see `run.sh`
//! beside this file). Not a product command: it exists for the suite.
//!
//! ```text
//! conformance verify-bundle [--staging] --bundle FILE --certificate-identity IDENTITY
//!     --certificate-oidc-issuer URL [--trusted-root FILE] FILE_OR_DIGEST
//! conformance verify-bundle [--staging] --bundle FILE --key FILE [--trusted-root FILE]
//!     FILE_OR_DIGEST
//! ```
//! Exit status 0 when the bundle verifies, 1 when it does not (the reason on stderr), 2 for
//! a command line it does not understand (signing is not supported).

use std::process::ExitCode;

use fixity::verify::{
    Authority, KeyRequirements, KeylessRequirements, Matcher, Subject, TrustRoot, verify_bundle,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(Ok(signer)) => {
            if let Some(signer) = signer {
                eprintln!("verified: signed by {signer}");
            } else {
                eprintln!("verified");
            }
            ExitCode::SUCCESS
        }
        Ok(Err(why)) => {
            eprintln!("not verified: {why}");
            ExitCode::from(1)
        }
        Err(usage) => {
            eprintln!("conformance: {usage}");
            ExitCode::from(2)
        }
    }
}

/// The command line parsed and run; the outer error is a usage error.
fn run(args: &[String]) -> Result<Result<Option<String>, String>, String> {
    let (command, rest) = args.split_first().ok_or("no subcommand")?;
    if command != "verify-bundle" {
        return Err(format!("{command} is not supported (verification only)"));
    }
    let mut staging = false;
    let mut bundle = None;
    let mut identity = None;
    let mut issuer = None;
    let mut key = None;
    let mut trusted_root = None;
    let mut input = None;
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().cloned().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--staging" => staging = true,
            "--bundle" => bundle = Some(value()?),
            "--certificate-identity" => identity = Some(value()?),
            "--certificate-oidc-issuer" => issuer = Some(value()?),
            "--key" => key = Some(value()?),
            "--trusted-root" => trusted_root = Some(value()?),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            other => input = Some(other.to_owned()),
        }
    }
    let bundle = bundle.ok_or("--bundle is required")?;
    let input = input.ok_or("the artifact or its digest is required")?;
    let read = |path: &str| std::fs::read(path).map_err(|e| format!("{path}: {e}"));
    let root = match (&trusted_root, staging) {
        (Some(path), _) => {
            TrustRoot::Custom(String::from_utf8(read(path)?).map_err(|e| format!("{path}: {e}"))?)
        }
        (None, true) => {
            TrustRoot::Custom(sigstore_verify::trust_root::SIGSTORE_STAGING_TRUSTED_ROOT.to_owned())
        }
        (None, false) => TrustRoot::PublicGood,
    };
    let authority = match (key, identity, issuer) {
        (Some(path), None, None) => Authority::Key {
            public_key_pem: String::from_utf8(read(&path)?).map_err(|e| format!("{path}: {e}"))?,
            // The suite's managed-key bundles are logged; their entries must verify.
            requirements: KeyRequirements {
                tlog: true,
                timestamp: false,
                trust_root: root,
            },
        },
        (None, Some(identity), Some(issuer)) => Authority::Keyless {
            issuer: Matcher::Exact(issuer),
            subject: Matcher::Exact(identity),
            trust_root: root,
            requirements: KeylessRequirements::default(),
        },
        _ => {
            return Err(
                "give --key, or --certificate-identity and --certificate-oidc-issuer".into(),
            );
        }
    };
    let bundle_json = String::from_utf8(read(&bundle)?).map_err(|e| format!("{bundle}: {e}"))?;
    // A digest is `sha256:` and 64 hex digits that is not a file; anything else is a path.
    let is_digest = input
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        && !std::path::Path::new(&input).exists();
    if is_digest {
        Ok(verify_bundle(
            &bundle_json,
            Subject::Digest(&input),
            &authority,
        ))
    } else {
        let artifact = read(&input)?;
        Ok(verify_bundle(
            &bundle_json,
            Subject::Bytes(&artifact),
            &authority,
        ))
    }
}
