//! The kubelet's `CredentialProviderConfig` file (`kubelet.config.k8s.io/v1`), read with
//! serde_norway and checked as the kubelet checks it when it starts: at least one provider;
//! each with a name that is a file in the plugin directory (no path separators, no spaces, not
//! `.` or `..`, no two alike), at least one valid `matchImages` entry, a
//! `defaultCacheDuration` of zero or more (Go duration syntax: `12h`, `30m`, `1h30m`, `0`) and
//! the protocol version `credentialprovider.kubelet.k8s.io/v1`. `tokenAttributes` (plugins
//! handed a service account token, kubelet 1.33+) is refused: fixity has no pod's token to give.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::image_match::ImagePattern;

/// The file's own version and kind.
const CONFIG_API_VERSION: &str = "kubelet.config.k8s.io/v1";
const CONFIG_KIND: &str = "CredentialProviderConfig";
/// The protocol spoken on the plugin's stdin and stdout.
pub const PROTOCOL_API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";

/// Why a credential provider configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a CredentialProviderConfig: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProviderSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    token_attributes: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

/// One plugin, ready to run.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    /// `bin-dir/name`.
    pub program: PathBuf,
    pub match_images: Vec<ImagePattern>,
    /// Used when an answer names no `cacheDuration`; zero: not cached.
    pub default_cache_duration: Duration,
    pub args: Vec<String>,
    /// Added to fixity's own environment, as the kubelet does.
    pub env: Vec<(String, String)>,
}

impl Provider {
    pub fn matches(&self, image: &str) -> bool {
        self.match_images.iter().any(|p| p.matches(image))
    }
}

/// Reads `config` and finds each provider's plugin in `bin_dir`.
pub fn load(config: &Path, bin_dir: &Path) -> Result<Vec<Provider>, ProviderConfigError> {
    let shown = config.display().to_string();
    let text = std::fs::read_to_string(config).map_err(|source| ProviderConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let providers = parse(&text, bin_dir).map_err(|e| match e {
        Problem::Parse(message) => ProviderConfigError::Parse {
            path: shown.clone(),
            message,
        },
        Problem::Invalid(message) => ProviderConfigError::Invalid {
            path: shown.clone(),
            message,
        },
    })?;
    for p in &providers {
        let usable = std::fs::metadata(&p.program).map(|m| m.is_file());
        if !matches!(usable, Ok(true)) {
            return Err(ProviderConfigError::Invalid {
                path: shown,
                message: format!(
                    "provider {:?}: no plugin at {} (--image-credential-provider-bin-dir)",
                    p.name,
                    p.program.display()
                ),
            });
        }
    }
    Ok(providers)
}

/// Reads a configuration's text as `load` does, without looking for the plugins (for the fuzz
/// targets).
#[cfg(fuzzing)]
pub(crate) fn read(text: &str, bin_dir: &Path) -> Result<Vec<Provider>, String> {
    parse(text, bin_dir).map_err(|(Problem::Parse(m) | Problem::Invalid(m))| m)
}

enum Problem {
    Parse(String),
    Invalid(String),
}

fn parse(text: &str, bin_dir: &Path) -> Result<Vec<Provider>, Problem> {
    let file: File = serde_norway::from_str(text).map_err(|e| Problem::Parse(e.to_string()))?;
    let invalid = |m: String| Problem::Invalid(m);
    if file.kind != CONFIG_KIND || file.api_version != CONFIG_API_VERSION {
        return Err(invalid(format!(
            "apiVersion {:?} kind {:?}: expected apiVersion {CONFIG_API_VERSION}, kind \
             {CONFIG_KIND}",
            file.api_version, file.kind
        )));
    }
    if file.providers.is_empty() {
        return Err(invalid("at least one provider is required".into()));
    }
    let mut names = BTreeSet::new();
    file.providers
        .into_iter()
        .enumerate()
        .map(|(index, spec)| {
            let at = |m: String| invalid(format!("providers[{index}]: {m}"));
            let name = spec.name;
            if name.is_empty() {
                return Err(at("name is required".into()));
            }
            if name.contains(['/', '\\', ' ']) || name == "." || name == ".." {
                return Err(at(format!(
                    "name {name:?} must be a file name: no path separators or spaces"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(at(format!("name {name:?} is used twice")));
            }
            if spec.api_version != PROTOCOL_API_VERSION {
                return Err(at(format!(
                    "apiVersion {:?}: fixity speaks {PROTOCOL_API_VERSION}",
                    spec.api_version
                )));
            }
            if spec.token_attributes.is_some() {
                return Err(at(
                    "tokenAttributes is not supported: fixity has no pod's service \
                               account token to hand a plugin"
                        .into(),
                ));
            }
            if spec.match_images.is_empty() {
                return Err(at("matchImages needs at least one entry".into()));
            }
            let match_images = spec
                .match_images
                .iter()
                .map(|m| ImagePattern::parse(m).map_err(|e| at(format!("matchImages: {e}"))))
                .collect::<Result<_, _>>()?;
            let cache = spec
                .default_cache_duration
                .ok_or_else(|| at("defaultCacheDuration is required".into()))?;
            let default_cache_duration =
                go_duration(&cache).map_err(|e| at(format!("defaultCacheDuration: {e}")))?;
            let mut env = Vec::with_capacity(spec.env.len());
            for var in spec.env {
                if var.name.is_empty() || var.name.contains('=') {
                    return Err(at(format!("env: {:?} is not a variable name", var.name)));
                }
                env.push((var.name, var.value));
            }
            Ok(Provider {
                program: bin_dir.join(&name),
                name,
                match_images,
                default_cache_duration,
                args: spec.args,
                env,
            })
        })
        .collect()
}

/// A duration as Go's `time.ParseDuration` writes it (`12h`, `1h30m`, `500ms`, `0`); negative
/// ones, and ones past Go's range, are refused.
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let parsed: jiff::SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration such as 12h or 30m: {e}"))?;
    let duration = Duration::try_from(parsed).map_err(|_| format!("{text:?} is negative"))?;
    // Go counts a duration in int64 nanoseconds and refuses longer ones; the kubelet would
    // refuse the answer, and fixity's clock could not have the duration added to it.
    if duration > Duration::from_nanos(i64::MAX.unsigned_abs()) {
        return Err(format!(
            "{text:?} is longer than a Go duration can be (about 292 years)"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages: ['*.dkr.ecr.*.amazonaws.com', 'registry.io:8080/path']
    defaultCacheDuration: 12h
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: nodes
  - name: other
    matchImages: ['gcr.io']
    defaultCacheDuration: '0'
    apiVersion: credentialprovider.kubelet.k8s.io/v1
";

    fn problem(text: &str) -> String {
        match parse(text, Path::new("/plugins")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(Problem::Parse(m) | Problem::Invalid(m)) => m,
        }
    }

    #[test]
    fn reads_the_kubelet_file() {
        let providers = parse(GOOD, Path::new("/plugins")).ok().unwrap();
        assert_eq!(providers.len(), 2);
        let ecr = &providers[0];
        assert_eq!(ecr.program, Path::new("/plugins/ecr-credential-provider"));
        assert_eq!(ecr.default_cache_duration, Duration::from_secs(12 * 3600));
        assert_eq!(ecr.args, ["get-credentials"]);
        assert_eq!(ecr.env, [("AWS_PROFILE".to_owned(), "nodes".to_owned())]);
        assert!(ecr.matches("123.dkr.ecr.eu-west-1.amazonaws.com/app"));
        assert!(ecr.matches("registry.io:8080/path/app"));
        assert!(!ecr.matches("gcr.io/app"));
        assert_eq!(providers[1].default_cache_duration, Duration::ZERO);
    }

    #[test]
    fn refuses_what_the_kubelet_refuses() {
        let swap = |from: &str, to: &str| GOOD.replacen(from, to, 1);
        for (text, needle) in [
            (swap("kubelet.config.k8s.io/v1", "v1"), "expected apiVersion"),
            (swap("name: ecr-credential-provider", "name: ../bin/sh"), "file name"),
            (swap("name: ecr-credential-provider", "name: ''"), "name is required"),
            (swap("name: other", "name: ecr-credential-provider"), "used twice"),
            (swap("defaultCacheDuration: 12h", "defaultCacheDuration: -1h"), "negative"),
            (swap("defaultCacheDuration: 12h", "defaultCacheDuration: soon"), "not a duration"),
            (swap("    defaultCacheDuration: 12h\n", ""), "defaultCacheDuration is required"),
            (swap("['*.dkr.ecr.*.amazonaws.com', 'registry.io:8080/path']", "[]"), "at least one"),
            (swap("'registry.io:8080/path'", "'r[.io'"), "matchImages"),
            (
                swap("credentialprovider.kubelet.k8s.io/v1\n    args", "credentialprovider.kubelet.k8s.io/v1beta1\n    args"),
                "fixity speaks",
            ),
            (swap("    args:", "    tokenAttributes: {}\n    args:"), "tokenAttributes"),
            (swap("    args:", "    argz: []\n    args:"), "unknown field"),
            (
                "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n".into(),
                "at least one provider",
            ),
            ("[not, a, map]".into(), "invalid type"),
        ] {
            let m = problem(&text);
            assert!(m.contains(needle), "{needle:?} not in {m:?}");
        }
    }

    #[test]
    fn go_durations() {
        for (text, secs) in [
            ("12h", 43200),
            ("1h30m", 5400),
            ("90s", 90),
            ("0s", 0),
            ("0", 0),
        ] {
            assert_eq!(go_duration(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert_eq!(go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(go_duration("").is_err());
        assert!(go_duration("-5m").is_err());
    }

    #[test]
    fn a_missing_plugin_is_refused_when_the_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, GOOD).unwrap();
        let err = load(&config, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("provider \"ecr-credential-provider\": no plugin at"),
            "{err}"
        );
        let err = load(&dir.path().join("absent.yaml"), dir.path()).unwrap_err();
        assert!(matches!(err, ProviderConfigError::Read { .. }), "{err}");
    }
}
