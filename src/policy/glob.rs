//! Globs over image names (`registry/repository`): `*` matches within one path segment,
//! `**` matches across segments, everything else is literal.

use std::borrow::Cow;
use std::fmt;

use crate::image::canonical_registry;

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
    shape: Shape,
}

/// Most registry patterns are a literal, or a literal followed by one star: those are matched
/// without the general algorithm (and without allocating), on every image of every review.
#[derive(Clone, PartialEq, Eq)]
enum Shape {
    Exact(Vec<u8>),
    Prefix { prefix: Vec<u8>, crosses: bool },
    General,
}

/// Plain HTTP's default port, which globs ignore (see [`Glob::matches`]).
const HTTP_PORT: &str = ":80";

/// A pattern as it matches: lowercase, and a literal host named as references name it
/// ([`canonical_registry`]), without `:80`; a host with a `*` only loses a default port.
fn canonical_pattern(pattern: &str) -> String {
    let lower = pattern.to_ascii_lowercase();
    let (host, rest) = lower.split_once('/').unwrap_or((&lower, ""));
    let host = host.strip_suffix(HTTP_PORT).unwrap_or(host);
    let host = if host.contains('*') {
        Cow::Borrowed(host.strip_suffix(":443").unwrap_or(host))
    } else {
        canonical_registry(host)
    };
    if lower.contains('/') {
        format!("{host}/{rest}")
    } else {
        host.into_owned()
    }
}

/// Names up to this long are matched with buffers on the stack (valid names have at most 255).
const STACK_NAME: usize = 511;

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
        let bytes = canonical_pattern(pattern).into_bytes();
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
        let literal = |ts: &[Token]| -> Option<Vec<u8>> {
            ts.iter()
                .map(|t| match t {
                    Token::Byte(b) => Some(*b),
                    _ => None,
                })
                .collect()
        };
        let shape = if let Some(exact) = literal(&tokens) {
            Shape::Exact(exact)
        } else if let Some((last @ (Token::Star | Token::DoubleStar), rest)) = tokens.split_last()
            && let Some(prefix) = literal(rest)
        {
            Shape::Prefix {
                prefix,
                crosses: matches!(last, Token::DoubleStar),
            }
        } else {
            Shape::General
        };
        Ok(Self {
            source: pattern.to_owned(),
            tokens,
            shape,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` (compared case-insensitively) matches the whole pattern. A name on port
    /// 80 of a host matches as that host: a plain-HTTP endpoint of a registry is the same
    /// registry's, and must not slip out of the rules written for it.
    pub fn matches(&self, name: &str) -> bool {
        match name.split_once('/') {
            Some((host, rest)) if host.ends_with(HTTP_PORT) => {
                let host = &host[..host.len() - HTTP_PORT.len()];
                self.matches_name(format!("{host}/{rest}").as_bytes())
            }
            _ => self.matches_name(name.as_bytes()),
        }
    }

    fn matches_name(&self, name: &[u8]) -> bool {
        match &self.shape {
            Shape::Exact(literal) => literal.eq_ignore_ascii_case(name),
            Shape::Prefix { prefix, crosses } => {
                name.len() >= prefix.len()
                    && name[..prefix.len()].eq_ignore_ascii_case(prefix)
                    && (*crosses || !name[prefix.len()..].contains(&b'/'))
            }
            Shape::General if name.len() <= STACK_NAME => {
                let (mut a, mut b) = ([false; STACK_NAME + 1], [false; STACK_NAME + 1]);
                self.general(name, &mut a[..=name.len()], &mut b[..=name.len()])
            }
            Shape::General => {
                let (mut a, mut b) = (vec![false; name.len() + 1], vec![false; name.len() + 1]);
                self.general(name, &mut a, &mut b)
            }
        }
    }

    /// Any pattern: `reachable[j]` says the tokens consumed so far can match `name[..j]`.
    fn general<'b>(
        &self,
        name: &[u8],
        mut reachable: &'b mut [bool],
        mut next: &'b mut [bool],
    ) -> bool {
        reachable.fill(false);
        reachable[0] = true;
        for token in &self.tokens {
            next.fill(false);
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
            std::mem::swap(&mut reachable, &mut next);
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

    /// A glob sees registry names after the reference parser folded their aliases; a glob
    /// written with an alias, or an image on port 80 of a covered host, matches the same.
    #[test]
    fn aliases_match_as_the_registry_they_name() {
        let cases = [
            ("ghcr.io/acme/**", "ghcr.io:80/acme/app", true),
            ("ghcr.io:443/acme/**", "ghcr.io/acme/app", true),
            ("ghcr.io:80/acme/**", "ghcr.io/acme/app", true),
            ("GHCR.io:443/acme/*", "ghcr.io/acme/app", true),
            ("index.docker.io/acme/**", "docker.io/acme/app", true),
            ("registry-1.docker.io/acme/*", "docker.io/acme/app", true),
            (
                "registry.hub.docker.com/library/*",
                "docker.io/library/nginx",
                true,
            ),
            ("docker.io:443/library/*", "docker.io/library/nginx", true),
            ("docker.io/acme/**", "docker.io:80/acme/app", true),
            ("ghcr.io/acme/**", "ghcr.io:8443/acme/app", false),
            ("ghcr.io:8443/acme/**", "ghcr.io/acme/app", false),
            ("ghcr.io/acme/**", "ghcr.io.evil.example:80/acme/app", false),
            ("*.docker.io/**", "docker.io/acme/app", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                Glob::new(pattern).unwrap().matches(name),
                expected,
                "{pattern} vs {name}"
            );
        }
        // Messages show the pattern as the policy wrote it.
        assert_eq!(
            Glob::new("index.docker.io/acme/**").unwrap().as_str(),
            "index.docker.io/acme/**"
        );
    }

    #[test]
    fn every_shape_agrees_with_the_general_matcher() {
        let names = [
            "ghcr.io/acme/app",
            "ghcr.io/acme/a/b",
            "GHCR.io/acme/app",
            "ghcr.io/acme",
            "ghcr.io/acme/",
            "x/ghcr.io/acme/app",
        ];
        for pattern in [
            "ghcr.io/acme/app",
            "ghcr.io/acme/*",
            "ghcr.io/acme/**",
            "ghcr.io/*/app",
            "**",
        ] {
            let glob = Glob::new(pattern).unwrap();
            for name in names {
                let general = glob.general(
                    name.as_bytes(),
                    &mut vec![false; name.len() + 1],
                    &mut vec![false; name.len() + 1],
                );
                assert_eq!(glob.matches(name), general, "{pattern} vs {name}");
            }
        }
        let long = format!("ghcr.io/acme/{}", "a".repeat(600));
        assert!(
            Glob::new("ghcr.io/*/a*").unwrap().matches(&long),
            "names past the stack buffers"
        );
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
