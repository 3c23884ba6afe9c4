//! Identity templates: a keyless authority's `subject` or `subjectRegExp` may name parts of the
//! image and of the request, so that one rule says "images under `ghcr.io/acme/<team>/` are
//! signed by `https://github.com/acme/<team>/` workflows" for every team.
//!
//! The syntax is `${variable}`, and `${` always starts one:
//! - `${namespace}`: the namespace of the request;
//! - `${image.registry}`: the image's registry (`ghcr.io`, `127.0.0.1:5000`);
//! - `${image.path[N]}`: segment N, counted from 0, of the image's repository path
//!   (`ghcr.io/acme/team-a/app`: `${image.path[0]}` is `acme`, `${image.path[1]}` is `team-a`).
//!
//! Templates are parsed when the policy is read: an unknown variable or an unclosed `${`
//! refuses the policy. An expanded `subjectRegExp` matches the whole value, as every identity
//! regexp does (see [`whole_value_regex`]); each value is escaped (`regex::escape`) before it
//! enters the pattern, so a value can only ever match itself: a path segment `team.a` never
//! matches a subject naming `teamXa`. An image without the segment a template names cannot be
//! verified by that authority.

use std::fmt;

use crate::image::ImageReference;
use crate::verify::Matcher;

/// What a template is expanded with: one image in one request.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub image: &'a ImageReference,
    pub namespace: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Var {
    Namespace,
    Registry,
    Path(usize),
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Namespace => f.write_str("${namespace}"),
            Var::Registry => f.write_str("${image.registry}"),
            Var::Path(n) => write!(f, "${{image.path[{n}]}}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A subject (exact, or a regular expression) with variables in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityTemplate {
    parts: Vec<Part>,
    /// Values are escaped and the expansion compiled as a regular expression.
    regex: bool,
    raw: String,
}

impl IdentityTemplate {
    /// Parses `text`; `None` when it names no variable (it is then used as written).
    pub fn parse(text: &str, regex: bool) -> Result<Option<Self>, String> {
        if !text.contains("${") {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("an unclosed ${{ in {text:?}"))?;
            parts.push(Part::Var(variable(after[..end].trim())?));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let template = Self {
            parts,
            regex,
            raw: text.to_owned(),
        };
        if regex {
            // Escaped values are literals: if the pattern compiles with one, it compiles with all.
            let sample = template.render(|_| Ok("x".to_owned()))?;
            whole_value_regex(&sample).map_err(|e| format!("{text:?}: {e}"))?;
        }
        Ok(Some(template))
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The subject for this image and request, values escaped for a regular expression.
    pub fn expand(&self, context: &Context<'_>) -> Result<String, String> {
        self.render(|var| {
            let value = match var {
                Var::Namespace => context.namespace,
                Var::Registry => context.image.registry(),
                Var::Path(n) => context
                    .image
                    .repository()
                    .split('/')
                    .nth(*n)
                    .ok_or_else(|| {
                        format!(
                            "the identity {:?} names {var}, and {} has no path segment {n}",
                            self.raw,
                            context.image.name()
                        )
                    })?,
            };
            if value.is_empty() {
                return Err(format!(
                    "the identity {:?} names {var}, which is empty here",
                    self.raw
                ));
            }
            Ok(value.to_owned())
        })
    }

    /// The matcher for this image and request.
    pub fn matcher(&self, context: &Context<'_>) -> Result<Matcher, String> {
        let expanded = self.expand(context)?;
        if self.regex {
            whole_value_regex(&expanded)
                .map(Matcher::Regex)
                .map_err(|e| format!("the identity {:?} expands to a bad pattern: {e}", self.raw))
        } else {
            Ok(Matcher::Exact(expanded))
        }
    }

    fn render(
        &self,
        mut value: impl FnMut(&Var) -> Result<String, String>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(self.raw.len() + 16);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(var) => {
                    let value = value(var)?;
                    if self.regex {
                        out.push_str(&regex::escape(&value));
                    } else {
                        out.push_str(&value);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn variable(name: &str) -> Result<Var, String> {
    let unknown = || {
        format!(
            "unknown variable ${{{name}}}; known are ${{namespace}}, ${{image.registry}} and \
             ${{image.path[N]}}"
        )
    };
    match name {
        "namespace" => Ok(Var::Namespace),
        "image.registry" => Ok(Var::Registry),
        _ => {
            let index = name
                .strip_prefix("image.path[")
                .and_then(|r| r.strip_suffix(']'))
                .ok_or_else(unknown)?;
            if index.is_empty() || index.len() > 3 || !index.bytes().all(|b| b.is_ascii_digit()) {
                return Err(unknown());
            }
            index.parse().map(Var::Path).map_err(|_| unknown())
        }
    }
}

/// An identity regexp that must match the whole value, as an exact identity would:
/// `...@refs/heads/main` must not accept `...@refs/heads/main-evil`. The pattern is checked
/// alone first, so wrapping it cannot change how it parses (a valid pattern has balanced
/// groups); the only way the wrap can go wrong is a verbose-mode `#` comment running to the
/// end, which swallows the closing anchor and makes the wrapped pattern fail to compile.
pub fn whole_value_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(pattern).map_err(|e| e.to_string())?;
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|_| {
        "a trailing # comment (verbose mode) must end with a newline; the pattern is matched \
         against the whole value"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context<'a>(image: &'a ImageReference, namespace: &'a str) -> Context<'a> {
        Context { image, namespace }
    }

    fn image(text: &str) -> ImageReference {
        ImageReference::parse(text).unwrap()
    }

    #[test]
    fn templates_expand_path_segments_registry_and_namespace() {
        let img = image("ghcr.io/acme/team-a/app:v1");
        let t = IdentityTemplate::parse(
            "https://github.com/${image.path[0]}/${ image.path[1] }/x@${namespace}/${image.registry}",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t.expand(&context(&img, "shop")).unwrap(),
            "https://github.com/acme/team-a/x@shop/ghcr.io"
        );
        assert_eq!(
            IdentityTemplate::parse("https://github.com/acme/", true),
            Ok(None)
        );
        // Docker Hub names are normalised first: library/ is segment 0.
        let hub = image("nginx");
        let t = IdentityTemplate::parse("${image.path[0]}-${image.path[1]}", false)
            .unwrap()
            .unwrap();
        assert_eq!(t.expand(&context(&hub, "ns")).unwrap(), "library-nginx");
    }

    #[test]
    fn values_are_escaped_before_they_enter_a_pattern() {
        let t = IdentityTemplate::parse("https://github.com/acme/${image.path[1]}/.*", true)
            .unwrap()
            .unwrap();
        let dotted = image("ghcr.io/acme/team.a/app");
        let m = t.matcher(&context(&dotted, "ns")).unwrap();
        assert!(m.matches("https://github.com/acme/team.a/.github/workflows/r.yml@main"));
        assert!(!m.matches("https://github.com/acme/teamXa/.github/workflows/r.yml@main"));
        // An expanded pattern matches the whole value, as every identity regexp does.
        let pinned =
            IdentityTemplate::parse("https://github.com/acme/${image.path[1]}/w@main", true)
                .unwrap()
                .unwrap();
        let m = pinned.matcher(&context(&dotted, "ns")).unwrap();
        assert!(m.matches("https://github.com/acme/team.a/w@main"));
        assert!(!m.matches("https://github.com/acme/team.a/w@main-evil"));
        assert!(!m.matches("https://evil.example/?https://github.com/acme/team.a/w@main"));
        let exact = IdentityTemplate::parse("https://github.com/acme/${image.path[1]}", false)
            .unwrap()
            .unwrap();
        let m = exact.matcher(&context(&dotted, "ns")).unwrap();
        assert!(m.matches("https://github.com/acme/team.a"));
        assert!(!m.matches("https://github.com/acme/teamXa"));
        assert!(!m.matches("https://github.com/acme/team.a/more"));
    }

    #[test]
    fn an_image_without_the_segment_cannot_be_matched() {
        let t = IdentityTemplate::parse("${image.path[2]}", true)
            .unwrap()
            .unwrap();
        let err = t
            .matcher(&context(&image("ghcr.io/acme/app"), "ns"))
            .unwrap_err();
        assert!(
            err.contains("ghcr.io/acme/app has no path segment 2"),
            "{err}"
        );
    }

    #[test]
    fn unknown_variables_and_broken_templates_are_refused() {
        for (text, regex, needle) in [
            ("${team}", false, "unknown variable ${team}"),
            ("${image.path}", false, "unknown variable"),
            ("${image.path[-1]}", false, "unknown variable"),
            ("${image.path[1x]}", false, "unknown variable"),
            ("${image.path[99999]}", false, "unknown variable"),
            ("${IMAGE.REGISTRY}", false, "unknown variable"),
            ("https://x/${namespace", false, "unclosed"),
            ("^(${namespace}", true, "unclosed group"),
        ] {
            let err = IdentityTemplate::parse(text, regex).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
