//! `fixity verify IMAGE`: explains, for one image, which authority's signature is trusted or
//! why none is, and for each attestation a rule requires, which one counted, or what was
//! missing and which condition failed with what it saw, under the given policies.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use clap::Args;

use super::check::RegistryArgs;
use crate::image::ImageReference;
use crate::policy;
use crate::policy::identity::Context;
use crate::verify::{AttestationCheck, AttestationRule, Verifier};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The image, pinned by digest (`registry/repository@sha256:...`).
    pub image: String,
    /// ImmutabilityPolicy file(s) whose verify rules apply (repeatable).
    #[arg(long = "policy", value_name = "FILE", required = true)]
    pub policies: Vec<PathBuf>,
    /// The namespace a pod of the image would run in, for identity templates (`${namespace}`).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Exit 0 when every rule covering the image is satisfied, 1 when one is not, 2 when the
/// input is unusable.
pub fn run(args: VerifyArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("fixity verify: {message}");
        ExitCode::from(2)
    };
    let image = match ImageReference::parse(&args.image) {
        Ok(image) if image.digest().is_some() => image,
        Ok(_) => {
            return fail(format!(
                "{} has no digest; signatures are checked for pinned images only",
                args.image
            ));
        }
        Err(e) => return fail(format!("{}: {e}", args.image)),
    };
    let policies = match policy::files::load(&args.policies) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let verifier = match Verifier::new(args.registry.options()) {
        Ok(v) => v,
        Err(e) => return fail(e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e.to_string()),
    };

    let name = image.name();
    let (mut rules, mut failed) = (0, 0);
    for policy in &policies {
        for (index, rule) in policy.verify.iter().enumerate() {
            if !rule.covers(name) {
                continue;
            }
            rules += 1;
            let threshold = match rule.min_authorities {
                1 => String::new(),
                n => format!(" ({n} distinct authorities must sign)"),
            };
            println!("policy {} verify[{index}]{threshold}:", policy.name);
            let context = Context {
                image: &image,
                namespace: &args.namespace,
            };
            let authorities = match rule.authorities_for(&context) {
                Ok(authorities) => authorities,
                Err(why) => {
                    failed += 1;
                    println!("  NOT verified: {why}");
                    continue;
                }
            };
            for authority in authorities.iter() {
                println!("  authority: {}", authority.describe());
            }
            let attestations: Vec<Arc<AttestationRule>> =
                rule.attestations.iter().map(|a| a.rule.clone()).collect();
            let signers =
                (!rule.authorities.is_empty()).then_some((&authorities[..], rule.min_authorities));
            let started = Instant::now();
            let verdict = runtime.block_on(verifier.verify_image(
                &image,
                signers,
                &attestations,
                &[],
                SystemTime::now(),
            ));
            let took = started.elapsed().as_millis();
            let requests = verdict.registry_requests;
            match verdict.signature {
                Some(Ok(v)) => println!(
                    "  verified by {}{} ({:?}, {requests} registry requests, {took} ms)",
                    v.description,
                    v.signer
                        .map(|s| format!(", signer {s}"))
                        .unwrap_or_default(),
                    v.format,
                ),
                Some(Err(e)) => {
                    failed += 1;
                    println!("  NOT verified ({took} ms): {e}");
                }
                None => {
                    println!("  no signature required ({requests} registry requests, {took} ms)")
                }
            }
            for (rule, check) in attestations.iter().zip(&verdict.attestations) {
                if !matches!(check, AttestationCheck::Satisfied { .. }) {
                    failed += 1;
                }
                explain_attestation(rule, check);
            }
        }
    }
    if rules == 0 {
        println!("no verify rule of the given policies covers {name}");
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn explain_attestation(rule: &AttestationRule, check: &AttestationCheck) {
    println!("  attestation {:?} ({}):", rule.name, rule.predicate_type);
    for authority in rule.authorities.iter() {
        println!("    authority: {}", authority.describe());
    }
    for condition in &rule.conditions {
        if condition.message == condition.expression {
            println!("    condition: {}", condition.expression);
        } else {
            println!(
                "    condition: {} ({})",
                condition.message, condition.expression
            );
        }
    }
    match check {
        AttestationCheck::Satisfied {
            by,
            signer,
            origin,
            notes,
        } => {
            let signer = signer
                .as_ref()
                .map(|s| format!(", signer {s}"))
                .unwrap_or_default();
            println!(
                "    satisfied by {origin}, signed by {by}{signer}; {} condition(s) hold",
                rule.conditions.len()
            );
            for note in notes {
                println!("    passed over: {note}");
            }
        }
        AttestationCheck::Missing(why) => println!("    MISSING: {why}"),
        AttestationCheck::ConditionFailed {
            signer,
            origin,
            failure,
        } => println!("    CONDITION FAILED on {origin}, signed by {signer}: {failure}"),
        AttestationCheck::Unavailable(why) => println!("    UNAVAILABLE: {why}"),
    }
}
