//! The kubelet's image matching, for a credential provider's `matchImages` and for the keys of
//! the `auth` map a provider answers with. As the kubelet documents it (and its
//! `credentialprovider.URLsMatch` does):
//!
//! - a pattern is an image without a scheme: a host, optionally `:port`, optionally a path;
//! - the host is split at `.` into labels; pattern and image must have the same number of
//!   labels, and each image label must match the pattern's label as a glob (`*` any run of
//!   characters, `[a-z]`, `[^a-z]`, `\` escapes), so `*.azurecr.io` matches
//!   `team.azurecr.io` but not `azurecr.io` nor `a.team.azurecr.io`;
//! - the ports must be equal: `registry.io:8080` matches only port 8080, and `registry.io`
//!   only an image without a port;
//! - the pattern's path must be a prefix of the image's path, character by character:
//!   `registry.io/team` matches `registry.io/team/app`, and also `registry.io/teamwork`, as in
//!   the kubelet. No globs in ports or paths; a `?` or `#` ends the pattern, as a URL query
//!   or fragment would.
//!
//! Splitting is our own, because it must be Go's `net/url` split that the kubelet makes and not
//! a WHATWG URL parse (the `url` crate lowercases hosts, applies IDNA and rewrites numeric
//! hosts, so `0x7f.1` would become `127.0.0.1` and match what the kubelet never matches); the
//! label glob is Go's `path.Match`, whose `[^…]` classes the `glob` crate spells `[!…]`.
//! A malformed pattern is refused when the configuration is read.

use std::fmt;

/// One `matchImages` entry or `auth` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePattern {
    raw: String,
    labels: Vec<String>,
    port: String,
    path: String,
}

/// `host[:port]` and the path (with its leading `/`), as Go's `url.Parse("https://" + s)`
/// separates them; a query or fragment ends the path.
fn split(text: &str) -> (&str, &str, &str) {
    let end = text.find(['?', '#']).unwrap_or(text.len());
    let text = &text[..end];
    let (authority, path) = match text.find('/') {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, ""),
    };
    // Userinfo is not part of the host; a bracketed IPv6 host keeps its colons.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let after_host = authority.find(']').map_or(0, |i| i + 1);
    match authority[after_host..].find(':') {
        Some(i) => (
            &authority[..after_host + i],
            &authority[after_host + i + 1..],
            path,
        ),
        None => (authority, "", path),
    }
}

impl ImagePattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let without_scheme = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let (host, port, path) = split(without_scheme);
        if host.is_empty() {
            return Err(format!("{text:?} names no registry host"));
        }
        if !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("{text:?}: the port {port:?} is not a number"));
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{text:?}: the host holds a space or control character"
            ));
        }
        let labels: Vec<String> = host.split('.').map(str::to_owned).collect();
        for label in &labels {
            glob_match(label, "").map_err(|e| format!("{text:?}: {e}"))?;
        }
        Ok(Self {
            raw: text.to_owned(),
            labels,
            port: port.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Whether `image` (`registry/repository`, without tag or digest) matches.
    pub fn matches(&self, image: &str) -> bool {
        let (host, port, path) = split(image);
        if port != self.port || !path.starts_with(&self.path) {
            return false;
        }
        let labels: Vec<&str> = host.split('.').collect();
        labels.len() == self.labels.len()
            && self
                .labels
                .iter()
                .zip(labels)
                .all(|(glob, label)| glob_match(glob, label) == Ok(true))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Go's `path.Match` over one host label: `*`, `?`, `[class]` (ranges, `^` negation), `\`
/// escapes. `Err` for a malformed pattern, whatever the name.
fn glob_match(pattern: &str, name: &str) -> Result<bool, String> {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    // Checks the whole pattern's syntax first, so a bad class after a mismatch still errs.
    let mut i = 0;
    while i < pattern.len() {
        i = match pattern[i] {
            '[' => class_end(&pattern, i)?,
            '\\' if i + 1 == pattern.len() => return Err("a trailing \\ escapes nothing".into()),
            '\\' => i + 2,
            _ => i + 1,
        };
    }
    Ok(glob_at(&pattern, &name))
}

/// Index just past the class starting at `start`.
fn class_end(pattern: &[char], start: usize) -> Result<usize, String> {
    let mut i = start + 1;
    if pattern.get(i) == Some(&'^') {
        i += 1;
    }
    let mut first = true;
    loop {
        match pattern.get(i) {
            None => return Err("an unclosed [ in a glob".into()),
            Some(']') if !first => return Ok(i + 1),
            Some(_) => {
                let (_, next) = class_char(pattern, i)?;
                i = next;
                if pattern.get(i) == Some(&'-') {
                    let (_, next) = class_char(pattern, i + 1)?;
                    i = next;
                }
            }
        }
        first = false;
    }
}

fn class_char(pattern: &[char], i: usize) -> Result<(char, usize), String> {
    match pattern.get(i) {
        Some('\\') => pattern
            .get(i + 1)
            .map(|c| (*c, i + 2))
            .ok_or_else(|| "a trailing \\ escapes nothing".to_owned()),
        Some('-' | ']') | None => Err("a bad character range in a glob".into()),
        Some(c) => Ok((*c, i + 1)),
    }
}

/// The classic single-backtrack wildcard match: linear in practice, never exponential, since
/// image names come from requests.
fn glob_at(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if pattern.get(p) == Some(&'*') {
            star = Some((p, n));
            p += 1;
            continue;
        }
        if let Some(next) = step(pattern, p, name[n]) {
            p = next;
            n += 1;
            continue;
        }
        match star {
            Some((at, from)) => {
                p = at + 1;
                n = from + 1;
                star = Some((at, from + 1));
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|c| *c == '*')
}

/// Where the pattern goes on if its token at `p` matches `c`.
fn step(pattern: &[char], p: usize, c: char) -> Option<usize> {
    match *pattern.get(p)? {
        '?' => Some(p + 1),
        '[' => {
            // Syntax was checked: the class is well formed.
            let end = class_end(pattern, p).ok()?;
            in_class(&pattern[p + 1..end - 1], c).then_some(end)
        }
        '\\' => (pattern.get(p + 1) == Some(&c)).then_some(p + 2),
        literal => (literal == c).then_some(p + 1),
    }
}

/// Whether `c` is in the class body (between `[` and `]`).
fn in_class(body: &[char], c: char) -> bool {
    let (negated, mut body) = match body.split_first() {
        Some(('^', rest)) => (true, rest),
        _ => (false, body),
    };
    let mut found = false;
    while !body.is_empty() {
        let Ok((lo, next)) = class_char(body, 0) else {
            break;
        };
        let (hi, next) = if body.get(next) == Some(&'-') {
            class_char(body, next + 1).unwrap_or((lo, next))
        } else {
            (lo, next)
        };
        found |= lo <= c && c <= hi;
        body = &body[next..];
    }
    found != negated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, image: &str) -> bool {
        ImagePattern::parse(pattern).unwrap().matches(image)
    }

    /// The examples of the kubelet's documentation, and what each must not match.
    #[test]
    fn the_documented_examples() {
        for (pattern, yes, no) in [
            (
                "123456789.dkr.ecr.us-east-1.amazonaws.com",
                vec!["123456789.dkr.ecr.us-east-1.amazonaws.com/app"],
                vec!["123456789.dkr.ecr.us-west-2.amazonaws.com/app"],
            ),
            (
                "*.azurecr.io",
                vec!["team.azurecr.io/app", "team.azurecr.io"],
                vec![
                    "azurecr.io/app",
                    "a.team.azurecr.io/app",
                    "team.azurecr.io:443/app",
                ],
            ),
            (
                "gcr.io",
                vec!["gcr.io/p/app"],
                vec!["us.gcr.io/p/app", "gcr.io.evil/app"],
            ),
            (
                "*.*.registry.io",
                vec!["a.b.registry.io/app"],
                vec!["a.registry.io/app", "a.b.c.registry.io/app"],
            ),
            (
                "registry.io:8080/path",
                vec!["registry.io:8080/path/app", "registry.io:8080/path"],
                vec![
                    "registry.io/path/app",
                    "registry.io:8081/path/app",
                    "registry.io:8080/other/app",
                ],
            ),
            // Globs in any label, partial labels too; one label each.
            (
                "k8s.*.io",
                vec!["k8s.gcr.io/x"],
                vec!["k8s.io/x", "k8s.a.b.io/x"],
            ),
            ("k8s.*", vec!["k8s.io/x"], vec!["k8s.gcr.io/x"]),
            (
                "app*.k8s.io",
                vec!["app1.k8s.io/x", "app.k8s.io/x"],
                vec!["web.k8s.io/x"],
            ),
        ] {
            for image in yes {
                assert!(matches(pattern, image), "{pattern} should match {image}");
            }
            for image in no {
                assert!(
                    !matches(pattern, image),
                    "{pattern} should not match {image}"
                );
            }
        }
    }

    #[test]
    fn ports_and_paths_follow_the_kubelet_to_the_letter() {
        // No port in the pattern: only images without one.
        assert!(!matches("registry.io", "registry.io:5000/app"));
        assert!(matches("127.0.0.1:5000", "127.0.0.1:5000/app"));
        // The path is a plain prefix, as in the kubelet: not cut at a segment.
        assert!(matches("registry.io/team", "registry.io/teamwork/app"));
        assert!(matches("registry.io/team/", "registry.io/team/app"));
        assert!(!matches("registry.io/team/", "registry.io/team"));
        // A scheme is allowed in auth keys, and ignored.
        assert!(matches("https://registry.io/team", "registry.io/team/app"));
        // No glob in the path: a literal `*`.
        assert!(!matches("registry.io/*", "registry.io/app"));
        // Case matters, as in Go's path.Match.
        assert!(!matches("Registry.io", "registry.io/app"));
    }

    #[test]
    fn classes_escapes_and_single_characters() {
        assert!(matches("r[0-9].io", "r7.io/x"));
        assert!(!matches("r[0-9].io", "rx.io/x"));
        assert!(matches("r[^0-9].io", "rx.io/x"));
        assert!(!matches("r[^0-9].io", "r7.io/x"));
        // `?` starts a query for Go's url.Parse, so in the kubelet it ends the host.
        assert!(matches("r?.io", "r/x"));
        assert!(!matches("r?.io", "r1.io/x"));
        assert!(matches(r"r\*.io", "r*.io/x"));
        assert!(!matches(r"r\*.io", "rr.io/x"));
        assert!(matches("*", "localhost/x"));
        assert!(!matches("*", "a.b/x"));
        // Many stars against a long label that almost matches: answered at once.
        let label = format!("{}b", "a".repeat(200));
        assert!(!matches(
            "*a*a*a*a*a*a*a*a*a*a*c.io",
            &format!("{label}.io/x")
        ));
        assert!(matches(
            "*a*a*a*a*a*a*a*a*a*a*b.io",
            &format!("{label}.io/x")
        ));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "r[.io",
            "r[].io",
            "r[a-].io",
            "r\\",
            "",
            ":5000",
            "r.io:http",
            "a b.io",
        ] {
            assert!(
                ImagePattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
