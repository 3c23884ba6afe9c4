//! Globs over image names (`registry/repository`): `*` matches within one path segment,
//! `**` matches across segments, everything else is literal.

use std::fmt;

/// Why a registry pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("the pattern is empty")]
    Empty,
    #[error("the pattern {0:?} contains whitespace or control characters")]
    Whitespace(String),
    #[error(
        "the pattern {0:?} must start with a registry host, e.g. docker.io/library/* or ghcr.io/acme/**"
    )]
    NoRegistry(String),
    #[error("the pattern {0:?} has three or more * in a row")]
    TooManyStars(String),
    #[error("the pattern {0:?} must not carry a tag or digest; it matches registry/repository")]
    TagOrDigest(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Byte(u8),
    /// Any run of bytes without `/`.
    Star,
    /// Any run of bytes.
    DoubleStar,
}

/// A compiled name glob.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(GlobError::Whitespace(pattern.to_owned()));
        }
        if pattern.contains("***") {
            return Err(GlobError::TooManyStars(pattern.to_owned()));
        }
        if pattern.contains('@') {
            return Err(GlobError::TagOrDigest(pattern.to_owned()));
        }
        let host = pattern.split('/').next().unwrap_or_default();
        let host_like =
            host.contains(['.', ':', '*']) || host == "localhost" || host.starts_with('[');
        if !host_like || !pattern.contains('/') && !host.contains('*') {
            return Err(GlobError::NoRegistry(pattern.to_owned()));
        }
        // A colon after the last slash would be a tag, which names never contain.
        if let Some(last) = pattern.rsplit('/').next()
            && pattern.contains('/')
            && last.contains(':')
        {
            return Err(GlobError::TagOrDigest(pattern.to_owned()));
        }
        let bytes = pattern.to_ascii_lowercase().into_bytes();
        let mut tokens = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'*' {
                if bytes.get(i + 1) == Some(&b'*') {
                    tokens.push(Token::DoubleStar);
                    i += 2;
                } else {
                    tokens.push(Token::Star);
                    i += 1;
                }
            } else {
                tokens.push(Token::Byte(bytes[i]));
                i += 1;
            }
        }
        Ok(Self {
            source: pattern.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` (compared case-insensitively) matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.as_bytes();
        // reachable[j]: the tokens consumed so far can match name[..j].
        let mut reachable = vec![false; name.len() + 1];
        reachable[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; name.len() + 1];
            match token {
                Token::Byte(b) => {
                    for j in 0..name.len() {
                        if reachable[j] && name[j].to_ascii_lowercase() == *b {
                            next[j + 1] = true;
                        }
                    }
                }
                Token::Star | Token::DoubleStar => {
                    let crosses = matches!(token, Token::DoubleStar);
                    let mut carry = false;
                    for j in 0..=name.len() {
                        carry |= reachable[j];
                        next[j] = carry;
                        if j < name.len() && name[j] == b'/' && !crosses {
                            carry = false;
                        }
                    }
                }
            }
            reachable = next;
        }
        reachable[name.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let cases = [
            ("ghcr.io/acme/*", "ghcr.io/acme/app", true),
            ("ghcr.io/acme/*", "ghcr.io/acme/team/app", false),
            ("ghcr.io/acme/**", "ghcr.io/acme/team/app", true),
            ("ghcr.io/acme/**", "ghcr.io/acmecorp/app", false),
            ("ghcr.io/acme/*", "ghcr.io/acme/", true),
            ("ghcr.io/acme/app", "ghcr.io/acme/app", true),
            ("ghcr.io/acme/app", "ghcr.io/acme/app2", false),
            ("ghcr.io/acme/app", "ghcr.io/acme/ap", false),
            (
                "*.dkr.ecr.eu-west-1.amazonaws.com/**",
                "123.dkr.ecr.eu-west-1.amazonaws.com/x/y",
                true,
            ),
            (
                "*.dkr.ecr.eu-west-1.amazonaws.com/**",
                "evil.com/x.dkr.ecr.eu-west-1.amazonaws.com/y",
                false,
            ),
            ("registry.k8s.io/*", "registry.k8s.io/pause", true),
            ("registry.k8s.io/*", "registry.k8s.io.evil.com/pause", false),
            ("docker.io/library/*", "docker.io/library/nginx", true),
            ("localhost:5000/**", "localhost:5000/a/b", true),
            ("Ghcr.IO/acme/*", "ghcr.io/acme/app", true),
            ("ghcr.io/*/app", "ghcr.io/acme/app", true),
            ("ghcr.io/*/app", "ghcr.io/a/b/app", false),
            ("ghcr.io/**/app", "ghcr.io/a/b/app", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                Glob::new(pattern).unwrap().matches(name),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn unusable_patterns() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(Glob::new("nginx"), Err(GlobError::NoRegistry(_))));
        assert!(matches!(
            Glob::new("library/nginx"),
            Err(GlobError::NoRegistry(_))
        ));
        assert!(matches!(
            Glob::new("ghcr.io"),
            Err(GlobError::NoRegistry(_))
        ));
        assert!(matches!(
            Glob::new("ghcr.io/a b"),
            Err(GlobError::Whitespace(_))
        ));
        assert!(matches!(
            Glob::new("ghcr.io/***"),
            Err(GlobError::TooManyStars(_))
        ));
        assert!(matches!(
            Glob::new("ghcr.io/app:v1"),
            Err(GlobError::TagOrDigest(_))
        ));
        assert!(matches!(
            Glob::new("ghcr.io/app@sha256:x"),
            Err(GlobError::TagOrDigest(_))
        ));
        assert!(Glob::new("**").is_ok());
    }
}
