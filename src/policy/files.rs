//! Policies read from files, for `serve --policy` and `check --policy`.

use std::path::{Path, PathBuf};

use super::{CompiledPolicy, ImmutabilityPolicy, PolicyError};
use crate::manifest::{self, ManifestError};

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error(
        "{path}: document {index}: expected an ImmutabilityPolicy (fixity.dev/v1alpha1), found {found}"
    )]
    WrongKind {
        path: PathBuf,
        index: usize,
        found: String,
    },
    #[error("{path}: document {index}: {message}")]
    Schema {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{path}: policy {name:?}: {source}")]
    Invalid {
        path: PathBuf,
        name: String,
        source: PolicyError,
    },
    #[error("{path}: holds no ImmutabilityPolicy")]
    Empty { path: PathBuf },
}

/// Reads and compiles every policy in the given files. Any invalid policy fails the whole load,
/// so a typo never leaves a policy silently missing.
pub fn load(paths: &[PathBuf]) -> Result<Vec<CompiledPolicy>, PolicyFileError> {
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: path.clone(),
            source,
        })?;
        out.extend(parse(path, &text)?);
    }
    Ok(out)
}

/// Compiles the policies in one file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<CompiledPolicy>, PolicyFileError> {
    let path = path.to_path_buf();
    let documents = manifest::parse(text).map_err(|source| PolicyFileError::Manifest {
        path: path.clone(),
        source,
    })?;
    if documents.is_empty() {
        return Err(PolicyFileError::Empty { path });
    }
    let mut out = Vec::new();
    for doc in documents {
        if doc.kind() != "ImmutabilityPolicy" || doc.api_version() != "fixity.dev/v1alpha1" {
            return Err(PolicyFileError::WrongKind {
                path,
                index: doc.index,
                found: format!("{} {}", doc.api_version(), doc.kind()),
            });
        }
        let index = doc.index;
        let policy: ImmutabilityPolicy =
            serde_json::from_value(doc.object).map_err(|e| PolicyFileError::Schema {
                path: path.clone(),
                index,
                message: e.to_string(),
            })?;
        let name = policy.metadata.name.clone().unwrap_or_default();
        out.push(
            CompiledPolicy::compile(&policy).map_err(|source| PolicyFileError::Invalid {
                path: path.clone(),
                name,
                source,
            })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

    fn parse_str(text: &str) -> Result<Vec<CompiledPolicy>, PolicyFileError> {
        parse(Path::new("p.yaml"), text)
    }

    #[test]
    fn reads_policies_with_defaults() {
        let ps = parse_str(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: audit}\n\
             spec:\n  mode: Audit\n  images: {allowedRegistries: ['ghcr.io/acme/*']}\n",
        )
        .unwrap();
        assert_eq!(ps[0].name, "audit");
        assert_eq!(ps[0].mode, Mode::Audit);
        assert!(ps[0].require_digest, "requireDigest defaults to true");
    }

    #[test]
    fn refuses_typos_wrong_kinds_and_invalid_rules() {
        let typo = parse_str(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: a}\nspec: {images: {requireDigests: true}}\n",
        );
        assert!(
            matches!(typo, Err(PolicyFileError::Schema { .. })),
            "{typo:?}"
        );
        let mode = parse_str(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: a}\nspec: {mode: Sometimes}\n",
        );
        assert!(matches!(mode, Err(PolicyFileError::Schema { .. })));
        let kind = parse_str("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n");
        assert!(matches!(kind, Err(PolicyFileError::WrongKind { .. })));
        let glob = parse_str(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: a}\nspec: {images: {allowedRegistries: [nginx]}}\n",
        );
        let err = glob.unwrap_err().to_string();
        assert!(
            err.contains("allowedRegistries[0]") && err.contains("registry host"),
            "{err}"
        );
        assert!(matches!(parse_str(""), Err(PolicyFileError::Empty { .. })));
    }
}
