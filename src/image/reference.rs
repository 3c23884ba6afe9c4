//! A parser for OCI image references that follows the normalisation container runtimes apply:
//! `busybox` is `docker.io/library/busybox:latest`, a registry port is not a tag, repository
//! paths are lowercase, and a digest names its algorithm and exact hex length.

use std::borrow::Cow;
use std::fmt;

/// Registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Other names Docker Hub answers to; an image or a glob written with one means `docker.io`.
const DOCKER_HUB_ALIASES: [&str; 3] = [
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];
/// Tag a runtime pulls when a reference carries neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Why a string is not a usable image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("the image reference is empty")]
    Empty,
    #[error("the image reference contains whitespace or control characters")]
    Whitespace,
    #[error("the repository name must be lowercase")]
    Uppercase,
    #[error("a bare 64-character hex string is an image ID, not a repository name")]
    ImageIdAsName,
    #[error("the registry host {0:?} is not a valid host[:port]")]
    InvalidRegistry(String),
    #[error(
        "the repository path {0:?} is not valid (lowercase letters, digits and single separators . _ __ -)"
    )]
    InvalidPath(String),
    #[error("the repository name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error(
        "the tag {0:?} is not valid (letters, digits, _ . -, at most {MAX_TAG_LEN}, not starting with . or -)"
    )]
    InvalidTag(String),
    #[error(
        "the digest {0:?} is malformed: expected sha256: with 64 or sha512: with 128 lowercase hex characters"
    )]
    InvalidDigest(String),
}

/// Digest algorithms a runtime accepts for pinning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

/// A content digest with a validated algorithm and hex length, as held by a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest<'a> {
    algorithm: DigestAlgorithm,
    hex: &'a str,
}

impl<'a> Digest<'a> {
    /// Parses `sha256:<64 hex>` or `sha512:<128 hex>`, lowercase hex only.
    pub fn parse(s: &'a str) -> Result<Self, ReferenceError> {
        let invalid = || ReferenceError::InvalidDigest(s.to_owned());
        let (algorithm, hex) = split_at_byte(s, b':').ok_or_else(invalid)?;
        let (algorithm, len) = match algorithm {
            "sha256" => (DigestAlgorithm::Sha256, 64),
            "sha512" => (DigestAlgorithm::Sha512, 128),
            _ => return Err(invalid()),
        };
        let lower_hex = |b: u8| b.is_ascii_digit() | (b'a'..=b'f').contains(&b);
        if hex.len() != len || !hex.bytes().fold(true, |ok, b| ok & lower_hex(b)) {
            return Err(invalid());
        }
        Ok(Self { algorithm, hex })
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &'a str {
        self.hex
    }
}

impl DigestAlgorithm {
    fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for Digest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// A fully normalised image reference, held as one string: `registry/repository[:tag][@digest]`
/// (without the implied `:latest`), and where each part ends. One allocation per reference:
/// every container of every pod is parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    text: String,
    /// Where the registry ends.
    registry_len: usize,
    /// Where `registry/repository` ends, allow-lists and signatures match on it.
    name_len: usize,
    /// Where the tag ends (`name_len` when there is none).
    tag_end: usize,
    /// The digest's algorithm; its text follows `tag_end` and `@`.
    digest: Option<DigestAlgorithm>,
}

impl ImageReference {
    /// Parses a reference as written in a pod spec.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        // One pass over the bytes decides for the usual plain-ASCII reference; only one with
        // a space, a control or a non-ASCII byte gets the check by character.
        // (`fold`, not `all`: without an early exit the loop is vectorised.)
        let plain = input
            .bytes()
            .fold(true, |ok, b| ok & (b > b' ') & (b < 0x7f));
        if !plain && input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ReferenceError::Whitespace);
        }
        if input.len() == 64 && input.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReferenceError::ImageIdAsName);
        }

        let (name_and_tag, digest) = match split_at_byte(input, b'@') {
            Some((rest, digest)) => (rest, Some((digest, Digest::parse(digest)?.algorithm))),
            None => (input, None),
        };
        // A tag separator is a colon after the last slash; earlier colons belong to a port.
        let last_slash = last_byte(name_and_tag, b'/').map_or(0, |i| i + 1);
        let (name, tag) = match last_byte(&name_and_tag[last_slash..], b':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_and_tag[..at], Some(&name_and_tag[at + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag)?;
        }

        let (registry, path) = split_registry(name);
        validate_registry(registry)?;
        if path
            .bytes()
            .fold(false, |upper, b| upper | b.is_ascii_uppercase())
        {
            return Err(ReferenceError::Uppercase);
        }
        validate_path(path)?;
        let host = registry;
        let registry = canonical_registry(host);
        // A first component that is a registry only by its uppercase letters (no dot, no
        // port, not localhost) reads, lowercased, as a repository path: its canonical form
        // would name an image on Docker Hub. Refused rather than guessed.
        if !(registry.contains(['.', ':']) || registry == "localhost") {
            return Err(ReferenceError::InvalidRegistry(host.to_owned()));
        }
        let library = registry == DEFAULT_REGISTRY && !path.contains('/');
        let tag_len = tag.map_or(0, |t| 1 + t.len());
        let digest_len = digest.map_or(0, |(d, _)| 1 + d.len());
        let mut text =
            String::with_capacity(registry.len() + 9 + path.len() + tag_len + digest_len);
        text.push_str(&registry);
        text.push('/');
        if library {
            text.push_str("library/");
        }
        text.push_str(path);
        let name_len = text.len();
        if name_len > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong);
        }
        if let Some(tag) = tag {
            text.push(':');
            text.push_str(tag);
        }
        let tag_end = text.len();
        if let Some((digest, _)) = digest {
            text.push('@');
            text.push_str(digest);
        }
        Ok(Self {
            text,
            registry_len: registry.len(),
            name_len,
            tag_end,
            digest: digest.map(|(_, algorithm)| algorithm),
        })
    }

    /// The registry host, with port if any (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.text[..self.registry_len]
    }

    /// The repository path inside the registry (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.text[self.registry_len + 1..self.name_len]
    }

    /// The tag as written, if any.
    pub fn tag(&self) -> Option<&str> {
        (self.tag_end > self.name_len).then(|| &self.text[self.name_len + 1..self.tag_end])
    }

    /// The digest as written, if any. A runtime pulls by digest when both are present.
    pub fn digest(&self) -> Option<Digest<'_>> {
        // `@`, the algorithm and `:` come before the hex.
        self.digest.map(|algorithm| Digest {
            algorithm,
            hex: &self.text[self.tag_end + 2 + algorithm.as_str().len()..],
        })
    }

    /// `registry/repository`, the string registry allow-lists are matched against.
    pub fn name(&self) -> &str {
        &self.text[..self.name_len]
    }
}

impl fmt::Display for ImageReference {
    /// The canonical form: `registry/repository[:tag][@digest]`, `:latest` when neither is given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        match self.tag_end == self.name_len && self.digest.is_none() {
            true => write!(f, ":{DEFAULT_TAG}"),
            false => Ok(()),
        }
    }
}

/// The one name of a registry host, so that a policy glob sees the same registry however a
/// workload spells it: lowercase (hostnames are case-insensitive), without HTTPS's default
/// port `:443` (the same endpoint), and Docker Hub's aliases as `docker.io`. Any other port,
/// `:80` included, is another endpoint to fetch from and stays.
pub fn canonical_registry(registry: &str) -> Cow<'_, str> {
    let mut host = Cow::Borrowed(registry);
    if registry.bytes().any(|b| b.is_ascii_uppercase()) {
        host = Cow::Owned(registry.to_ascii_lowercase());
    }
    if let Some(stripped) = host.strip_suffix(":443") {
        host = Cow::Owned(stripped.to_owned());
    }
    if DOCKER_HUB_ALIASES.contains(&&*host) {
        host = Cow::Borrowed(DEFAULT_REGISTRY);
    }
    host
}

/// Splits off the registry: the first component is a registry only when it looks like a host
/// (has a dot or a port, is `localhost`, or has uppercase letters, which paths never do).
fn split_registry(name: &str) -> (&str, &str) {
    match split_at_byte(name, b'/') {
        Some((first, rest))
            if first.bytes().any(|b| b == b'.' || b == b':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

fn validate_registry(registry: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidRegistry(registry.to_owned());
    let (host, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or_else(invalid)?;
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(invalid());
        }
        match after {
            "" => (None, None),
            _ => (None, Some(after.strip_prefix(':').ok_or_else(invalid)?)),
        }
    } else {
        match split_at_byte(registry, b':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host
        && !host_ok(host.as_bytes())
    {
        return Err(invalid());
    }
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid());
    }
    Ok(())
}

/// `s` split around the first `byte` (ASCII). A plain byte loop: for strings this short it
/// beats the setup of a `char` pattern search.
fn split_at_byte(s: &str, byte: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == byte)?;
    Some((&s[..i], &s[i + 1..]))
}

/// Where the last `byte` (ASCII) of `s` is.
fn last_byte(s: &str, byte: u8) -> Option<usize> {
    s.bytes().rposition(|b| b == byte)
}

/// Dot-separated labels of letters, digits and inner hyphens: no empty label, no label that
/// starts or ends with `-`.
fn host_ok(host: &[u8]) -> bool {
    // The start of the host counts as a dot: a label begins there.
    let mut prev = b'.';
    for &b in host {
        let ok = match b {
            b'.' => prev != b'.' && prev != b'-',
            b'-' => prev != b'.',
            _ => b.is_ascii_alphanumeric(),
        };
        if !ok {
            return false;
        }
        prev = b;
    }
    prev != b'.' && prev != b'-'
}

fn validate_path(path: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidPath(path.to_owned());
    if path.is_empty() {
        return Err(invalid());
    }
    for component in path.split('/') {
        if !path_component_ok(component.as_bytes()) {
            return Err(invalid());
        }
    }
    Ok(())
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
fn path_component_ok(c: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < c.len() && alnum(c[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == c.len() {
            return true;
        }
        match c[i] {
            b'.' => i += 1,
            b'_' => i += if c.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while c.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && word(bytes[0])
        && bytes
            .iter()
            .fold(true, |ok, &b| ok & (word(b) | (b == b'.') | (b == b'-')));
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag(tag.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sha256() -> String {
        format!("sha256:{H64}")
    }

    /// input, registry, repository, tag, has digest, canonical form
    type Case<'a> = (String, &'a str, &'a str, Option<&'a str>, bool, String);

    #[test]
    fn normalises_like_a_runtime() {
        let d = sha256();
        let h128 = H64.repeat(2);
        let cases: Vec<Case<'_>> = vec![
            (
                "busybox".into(),
                "docker.io",
                "library/busybox",
                None,
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "nginx:1.27".into(),
                "docker.io",
                "library/nginx",
                Some("1.27"),
                false,
                "docker.io/library/nginx:1.27".into(),
            ),
            (
                "acme/app".into(),
                "docker.io",
                "acme/app",
                None,
                false,
                "docker.io/acme/app:latest".into(),
            ),
            (
                "index.docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx:latest".into(),
            ),
            (
                "localhost/app".into(),
                "localhost",
                "app",
                None,
                false,
                "localhost/app:latest".into(),
            ),
            (
                "my-registry.eu-west-1.example.com:443/app".into(),
                "my-registry.eu-west-1.example.com",
                "app",
                None,
                false,
                "my-registry.eu-west-1.example.com/app:latest".into(),
            ),
            (
                "localhost:5000/app".into(),
                "localhost:5000",
                "app",
                None,
                false,
                "localhost:5000/app:latest".into(),
            ),
            (
                "host:5000/team/app:v1".into(),
                "host:5000",
                "team/app",
                Some("v1"),
                false,
                "host:5000/team/app:v1".into(),
            ),
            (
                "[::1]:5000/app:v1".into(),
                "[::1]:5000",
                "app",
                Some("v1"),
                false,
                "[::1]:5000/app:v1".into(),
            ),
            (
                "127.0.0.1:5000/app".into(),
                "127.0.0.1:5000",
                "app",
                None,
                false,
                "127.0.0.1:5000/app:latest".into(),
            ),
            (
                "ghcr.io/acme/app@".to_string() + &d,
                "ghcr.io",
                "acme/app",
                None,
                true,
                format!("ghcr.io/acme/app@{d}"),
            ),
            (
                "nginx:1.27@".to_string() + &d,
                "docker.io",
                "library/nginx",
                Some("1.27"),
                true,
                format!("docker.io/library/nginx:1.27@{d}"),
            ),
            (
                format!("registry.k8s.io/pause@sha512:{h128}"),
                "registry.k8s.io",
                "pause",
                None,
                true,
                format!("registry.k8s.io/pause@sha512:{h128}"),
            ),
            (
                "a.b/c__d/e-f/g---h.i_j".into(),
                "a.b",
                "c__d/e-f/g---h.i_j",
                None,
                false,
                "a.b/c__d/e-f/g---h.i_j:latest".into(),
            ),
            (
                "Registry.Example.com/app".into(),
                "registry.example.com",
                "app",
                None,
                false,
                "registry.example.com/app:latest".into(),
            ),
            (
                "app:V1_x.y-z".into(),
                "docker.io",
                "library/app",
                Some("V1_x.y-z"),
                false,
                "docker.io/library/app:V1_x.y-z".into(),
            ),
        ];
        for (input, registry, repository, tag, has_digest, canonical) in cases {
            let r = ImageReference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repository, "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(r.digest().is_some(), has_digest, "{input}");
            assert_eq!(r.to_string(), canonical, "{input}");
        }
    }

    #[test]
    fn rejects_what_a_runtime_rejects() {
        let d = sha256();
        let cases: Vec<(String, ReferenceError)> = vec![
            ("".into(), ReferenceError::Empty),
            ("nginx ".into(), ReferenceError::Whitespace),
            ("ngi\nnx".into(), ReferenceError::Whitespace),
            ("Nginx".into(), ReferenceError::Uppercase),
            ("acme/App".into(), ReferenceError::Uppercase),
            ("ghcr.io/Acme/app".into(), ReferenceError::Uppercase),
            // Found by the `reference` fuzz target: lowercased, `localhostw2500/a1` is a
            // Docker Hub repository, not this registry.
            (
                "localhostW2500/a1".into(),
                ReferenceError::InvalidRegistry("localhostW2500".into()),
            ),
            (
                "MyRegistry/app".into(),
                ReferenceError::InvalidRegistry("MyRegistry".into()),
            ),
            (H64.into(), ReferenceError::ImageIdAsName),
            (
                "nginx@sha256:abc".into(),
                ReferenceError::InvalidDigest("sha256:abc".into()),
            ),
            (
                format!("nginx@sha256:{}", H64.to_uppercase()),
                ReferenceError::InvalidDigest(format!("sha256:{}", H64.to_uppercase())),
            ),
            (
                format!("nginx@sha256:{H64}0"),
                ReferenceError::InvalidDigest(format!("sha256:{H64}0")),
            ),
            (
                format!("nginx@sha512:{H64}"),
                ReferenceError::InvalidDigest(format!("sha512:{H64}")),
            ),
            (
                format!("nginx@md5:{H64}"),
                ReferenceError::InvalidDigest(format!("md5:{H64}")),
            ),
            (
                format!("nginx@{H64}"),
                ReferenceError::InvalidDigest(H64.into()),
            ),
            (
                format!("nginx@{d}@{d}"),
                ReferenceError::InvalidDigest(format!("{d}@{d}")),
            ),
            ("nginx:".into(), ReferenceError::InvalidTag("".into())),
            ("nginx:-x".into(), ReferenceError::InvalidTag("-x".into())),
            ("nginx:a+b".into(), ReferenceError::InvalidTag("a+b".into())),
            (
                format!("nginx:{}", "a".repeat(129)),
                ReferenceError::InvalidTag("a".repeat(129)),
            ),
            (
                "nginx:1:2".into(),
                ReferenceError::InvalidPath("nginx:1".into()),
            ),
            (
                "/nginx".into(),
                ReferenceError::InvalidPath("/nginx".into()),
            ),
            (
                "nginx/".into(),
                ReferenceError::InvalidPath("nginx/".into()),
            ),
            ("a//b".into(), ReferenceError::InvalidPath("a//b".into())),
            ("a/.b".into(), ReferenceError::InvalidPath("a/.b".into())),
            ("a/b.".into(), ReferenceError::InvalidPath("a/b.".into())),
            (
                "a/b___c".into(),
                ReferenceError::InvalidPath("a/b___c".into()),
            ),
            ("ghcr.io/".into(), ReferenceError::InvalidPath("".into())),
            (
                "host:port/app".into(),
                ReferenceError::InvalidRegistry("host:port".into()),
            ),
            (
                "[::1/app".into(),
                ReferenceError::InvalidRegistry("[::1".into()),
            ),
            (
                "[zz]:5000/app".into(),
                ReferenceError::InvalidRegistry("[zz]:5000".into()),
            ),
            (
                format!("x.io/{}", "a".repeat(260)),
                ReferenceError::NameTooLong,
            ),
            ("ghcr.io/app:v1\u{0}".into(), ReferenceError::Whitespace),
            ("ghcr.io/app:v1\u{7f}".into(), ReferenceError::Whitespace),
            ("ghcr.io/app\tx:v1".into(), ReferenceError::Whitespace),
            // Not ASCII: the Unicode checks apply.
            ("ghcr.io/app:v1\u{a0}".into(), ReferenceError::Whitespace),
            ("ghcr.io/\u{2028}app:v1".into(), ReferenceError::Whitespace),
            ("ghcr.io/app\u{85}:v1".into(), ReferenceError::Whitespace),
        ];
        for (input, expected) in cases {
            assert_eq!(ImageReference::parse(&input), Err(expected), "{input:?}");
        }
        // Every edge of a host label, one at a time.
        for host in [
            "-bad.io", "bad-.io", "bad.-io", "bad.io-", ".bad.io", "bad.io.", "bad..io", "b_d.io",
        ] {
            assert_eq!(
                ImageReference::parse(&format!("{host}/app")),
                Err(ReferenceError::InvalidRegistry(host.into())),
                "{host}"
            );
        }
    }

    /// The names under which one registry is reached fold into one, before any policy glob
    /// sees them: `ghcr.io:443` is `ghcr.io`, Docker Hub answers as `docker.io`,
    /// `index.docker.io`, `registry-1.docker.io` and `registry.hub.docker.com`, and hostnames
    /// are case-insensitive. Port 80 is another endpoint (TLS there fails, or the node speaks
    /// plain HTTP to it) and stays, for fetching; globs ignore it (`glob::tests`).
    #[test]
    fn registry_aliases_fold_into_one_name() {
        let d = sha256();
        for (input, name) in [
            ("ghcr.io:443/acme/app", "ghcr.io/acme/app"),
            ("GHCR.IO/acme/app", "ghcr.io/acme/app"),
            ("Ghcr.Io:443/acme/app", "ghcr.io/acme/app"),
            ("docker.io:443/acme/app", "docker.io/acme/app"),
            ("index.docker.io/acme/app", "docker.io/acme/app"),
            ("index.docker.io:443/acme/app", "docker.io/acme/app"),
            ("registry-1.docker.io/acme/app", "docker.io/acme/app"),
            ("Registry-1.Docker.IO:443/acme/app", "docker.io/acme/app"),
            ("registry.hub.docker.com/acme/app", "docker.io/acme/app"),
            ("registry-1.docker.io/nginx", "docker.io/library/nginx"),
            ("Docker.IO/nginx", "docker.io/library/nginx"),
            ("[::1]:443/app", "[::1]/app"),
            ("ghcr.io:80/acme/app", "ghcr.io:80/acme/app"),
            ("localhost:5000/app", "localhost:5000/app"),
        ] {
            let r = ImageReference::parse(&format!("{input}@{d}"))
                .unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.name(), name, "{input}");
            assert_eq!(r.to_string(), format!("{name}@{d}"), "{input}");
            assert_eq!(
                r.digest().map(|x| x.to_string()),
                Some(d.clone()),
                "{input}"
            );
        }
        // A trailing dot makes the host a different string to the runtime's parser, which
        // refuses it; so does fixity.
        assert_eq!(
            ImageReference::parse(&format!("ghcr.io./acme/app@{d}")),
            Err(ReferenceError::InvalidRegistry("ghcr.io.".into()))
        );
    }

    #[test]
    fn a_port_is_not_a_tag() {
        let r = ImageReference::parse("registry:5000/app").unwrap();
        assert_eq!(r.registry(), "registry:5000");
        assert_eq!(r.tag(), None);
        assert_eq!(r.name(), "registry:5000/app");
    }

    #[test]
    fn tag_and_digest_keep_the_digest() {
        let r = ImageReference::parse(&format!("ghcr.io/acme/app:v1@{}", sha256())).unwrap();
        assert_eq!(r.digest().map(|d| d.to_string()), Some(sha256()));
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.name(), "ghcr.io/acme/app");
        assert_eq!(r.repository(), "acme/app");
    }

    #[test]
    fn every_part_is_read_back_from_the_one_string() {
        let h128 = H64.repeat(2);
        for (input, tag, algorithm, hex) in [
            (
                format!("busybox@sha512:{h128}"),
                None,
                DigestAlgorithm::Sha512,
                &*h128,
            ),
            (
                format!("app:1.2@sha256:{H64}"),
                Some("1.2"),
                DigestAlgorithm::Sha256,
                H64,
            ),
            (
                format!("localhost:5000/app@sha256:{H64}"),
                None,
                DigestAlgorithm::Sha256,
                H64,
            ),
        ] {
            let r = ImageReference::parse(&input).unwrap();
            let digest = r.digest().unwrap();
            assert_eq!(
                (digest.algorithm(), digest.hex()),
                (algorithm, hex),
                "{input}"
            );
            assert_eq!(r.tag(), tag, "{input}");
        }
        let r = ImageReference::parse("localhost:5000/team/app:v2").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.name(), "localhost:5000/team/app");
        assert_eq!(r.tag(), Some("v2"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.to_string(), "localhost:5000/team/app:v2");
    }
}
