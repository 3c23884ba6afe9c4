//! Reading Kubernetes manifests: multi-document YAML or JSON, with `List` kinds flattened,
//! read as kubectl reads them so that `fixity check` judges what `kubectl apply` would send.
//!
//! serde_norway parses the YAML (anchors and aliases included); the mappings are built here
//! rather than by its `Value` because kubectl (sigs.k8s.io/yaml over go-yaml v2) and the crate
//! disagree on two things a manifest can use to hide an image: a duplicate key is an error
//! for `Value` and the last one for kubectl, and `apply_merge` keeps an explicit key over a
//! later merge (`<<`) where kubectl lets the merge override it
//! (`tests::the_crates_merge_differs_from_kubectl`).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a manifest cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML or JSON: {message}")]
    Syntax { index: usize, message: String },
    #[error(
        "line {line} (document {index}): not a Kubernetes object (expected a mapping with apiVersion and kind)"
    )]
    NotAnObject { index: usize, line: usize },
}

/// One Kubernetes object from a manifest: its 1-based document number, and the line its
/// object starts on (the document's, for an item of a `List`).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub index: usize,
    pub line: usize,
    pub object: Value,
}

impl Document {
    pub fn kind(&self) -> &str {
        self.object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn api_version(&self) -> &str {
        self.object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.metadata_str("name")
    }

    pub fn namespace(&self) -> &str {
        self.metadata_str("namespace")
    }

    fn metadata_str(&self, field: &str) -> &str {
        self.object
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Splits `text` into Kubernetes objects. Empty documents are skipped; `List` kinds
/// (`v1/List`, `PodList`, ...) contribute their items.
pub fn parse(text: &str) -> Result<Vec<Document>, ManifestError> {
    // Every document is read before any line is looked up: after a document with an alias to
    // an unknown anchor, the crate's iterator goes on with the rest of that document as if it
    // were the next, and reading that panics. Reading stops at the first error, and the line
    // probe runs only over the documents read before it.
    let mut values = Vec::new();
    let mut failed = None;
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        match AsKubectl::deserialize(de) {
            Ok(AsKubectl(value)) => values.push(value),
            Err(e) => {
                failed = Some(ManifestError::Syntax {
                    index: i + 1,
                    message: e.to_string(),
                });
                break;
            }
        }
    }
    let lines = first_lines(text, values.len());
    let mut documents = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let index = i + 1;
        let line = lines.get(i).copied().flatten().unwrap_or(1);
        match value {
            Value::Null => {}
            Value::Object(_) => push_object(&mut documents, index, line, value)?,
            _ => return Err(ManifestError::NotAnObject { index, line }),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(documents),
    }
}

/// The line each document's top-level node starts on, as the YAML parser saw it. The crate
/// reports positions only in errors, so a reader that refuses every mapping is run over the
/// documents first and the line taken from its error.
fn first_lines(text: &str, documents: usize) -> Vec<Option<usize>> {
    const PROBE: &str = "fixity: where the document starts";
    struct Probe;
    impl<'de> Visitor<'de> for Probe {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("anything")
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(PROBE))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(PROBE))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(PROBE))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(PROBE))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(PROBE))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(PROBE))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(PROBE))
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut lines = Vec::new();
    for de in serde_norway::Deserializer::from_str(text).take(documents) {
        match de.deserialize_any(Probe) {
            Err(e) if e.to_string().starts_with(PROBE) => {
                lines.push(e.location().map(|l| l.line()));
            }
            Ok(()) => lines.push(None),
            // A syntax error, which `parse` reports; the iterator would repeat it forever.
            Err(_) => break,
        }
    }
    lines
}

fn push_object(
    out: &mut Vec<Document>,
    index: usize,
    line: usize,
    object: Value,
) -> Result<(), ManifestError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let has_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty());
    if kind.is_empty() || !has_version {
        return Err(ManifestError::NotAnObject { index, line });
    }
    if kind.ends_with("List")
        && let Some(Value::Array(items)) = object.get("items")
    {
        for item in items {
            push_object(out, index, line, item.clone())?;
        }
        return Ok(());
    }
    out.push(Document {
        index,
        line,
        object,
    });
    Ok(())
}

/// A YAML node read into JSON the way kubectl reads it: mapping entries in order, a later
/// key replacing an earlier one, and a merge key (`<<`) setting every key of its mapping (or
/// of each mapping of its list, the first one winning) over what came before it.
struct AsKubectl(Value);

impl<'de> Deserialize<'de> for AsKubectl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KubectlVisitor).map(AsKubectl)
    }
}

struct KubectlVisitor;

impl<'de> Visitor<'de> for KubectlVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        AsKubectl::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(AsKubectl(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let AsKubectl(value) = map.next_value()?;
            if key != "<<" {
                out.insert(key, value);
                continue;
            }
            let merged = match value {
                Value::Object(m) => vec![m],
                // go-yaml merges the list from its end: the first mapping wins.
                Value::Array(list) => list
                    .into_iter()
                    .rev()
                    .map(|v| match v {
                        Value::Object(m) => Ok(m),
                        _ => Err(de::Error::custom(MERGE_NEEDS_MAPPINGS)),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(de::Error::custom(MERGE_NEEDS_MAPPINGS)),
            };
            for m in merged {
                out.extend(m);
            }
        }
        Ok(Value::Object(out))
    }
}

const MERGE_NEEDS_MAPPINGS: &str = "a merge key (<<) takes a mapping or a list of mappings";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists() {
        let text = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- {apiVersion: apps/v1, kind: Deployment, metadata: {name: b, namespace: x}}\n";
        let docs = parse(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].kind(), docs[0].name()), ("Pod", "a"));
        assert_eq!(
            (
                docs[1].kind(),
                docs[1].name(),
                docs[1].namespace(),
                docs[1].index
            ),
            ("Deployment", "b", "x", 3)
        );
    }

    fn containers(doc: &Document, pointer: &str) -> Vec<(String, String)> {
        doc.object
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap().into(),
                            c["image"].as_str().unwrap().into(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Merge keys are applied as kubectl applies them: a Deployment whose containers come in
    /// through `<<` is checked with those containers, not with a literal `<<` key.
    #[test]
    fn merge_keys_bring_in_what_kubectl_applies() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: base}
  spec:
    template:
      spec: &pod
        containers: [{name: web, image: 'nginx:1.27'}]
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: merged}
  spec:
    template:
      spec:
        <<: *pod
";
        let docs = parse(text).unwrap();
        assert_eq!(
            containers(&docs[1], "/spec/template/spec/containers"),
            [("web".into(), "nginx:1.27".into())]
        );
        assert!(docs[1].object.pointer("/spec/template/spec/<<").is_none());
    }

    /// What kubectl 1.36 made of these (`kubectl create --dry-run=client -o json`, whose YAML
    /// is go-yaml v2 under sigs.k8s.io/yaml): a merge overrides the keys before it, explicit
    /// keys after it win, the first of several merged mappings wins, a duplicate key's last
    /// value wins. tests/e2e.rs asks the real kubectl the same questions.
    #[test]
    fn merge_order_and_duplicates_follow_kubectl() {
        let image = |yaml: &str| {
            let docs = parse(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n  - name: web\n{yaml}"
            ))
            .unwrap();
            containers(&docs[0], "/spec/containers")[0].1.clone()
        };
        assert_eq!(
            image("    image: explicit\n    <<: {image: merged}\n"),
            "merged"
        );
        assert_eq!(
            image("    <<: {image: merged}\n    image: explicit\n"),
            "explicit"
        );
        assert_eq!(
            image("    <<: [{image: first}, {image: second}]\n"),
            "first"
        );
        assert_eq!(image("    image: first\n    image: last\n"), "last");
        assert!(matches!(
            parse("a:\n  <<: 7\n"),
            Err(ManifestError::Syntax { index: 1, .. })
        ));
    }

    /// Why the merge is not left to the YAML crate: serde_norway's `Value` refuses duplicate
    /// keys (kubectl takes the last), and its `apply_merge` keeps an explicit key over a later
    /// `<<` (kubectl lets the merge override it). Either would check other images than kubectl
    /// applies.
    #[test]
    fn the_crates_merge_differs_from_kubectl() {
        assert!(serde_norway::from_str::<serde_norway::Value>("a: 1\na: 2\n").is_err());
        let mut value: serde_norway::Value =
            serde_norway::from_str("image: explicit\n<<: {image: merged}\n").unwrap();
        value.apply_merge().unwrap();
        assert_eq!(value["image"], "explicit");
    }

    /// Each document knows the line its object starts on, for `file:line` locations.
    #[test]
    fn documents_know_their_first_line() {
        let text = "\
# Source: chart/templates/a.yaml
apiVersion: v1
kind: ConfigMap
metadata: {name: a}
---
# Source: chart/templates/b.yaml

apiVersion: v1
kind: Pod
metadata: {name: b}
---
---
{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [
  {\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"c\"}}]}
";
        let docs = parse(text).unwrap();
        let at: Vec<(&str, usize, usize)> =
            docs.iter().map(|d| (d.name(), d.index, d.line)).collect();
        assert_eq!(at, [("a", 1, 2), ("b", 2, 8), ("c", 4, 13)]);
    }

    #[test]
    fn json_is_accepted() {
        let docs = parse(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"}}"#).unwrap();
        assert_eq!(docs[0].name(), "j");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            parse("just some words"),
            Err(ManifestError::NotAnObject { index: 1, .. })
        ));
        assert!(matches!(
            parse("a: [1, 2"),
            Err(ManifestError::Syntax { index: 1, .. })
        ));
        assert!(matches!(
            parse("kind: Pod\n"),
            Err(ManifestError::NotAnObject { index: 1, line: 1 })
        ));
        assert!(matches!(
            parse("apiVersion: v1\nkind: Pod\n---\n- 1\n"),
            Err(ManifestError::NotAnObject { index: 2, line: 4 })
        ));
        assert!(parse("").unwrap().is_empty());
    }

    /// Found by the `manifest` and `policy` fuzz targets: an alias to an anchor no node
    /// declares made the YAML crate panic (`unexpected end of mapping`), in `fixity check`
    /// and while reading `--policy` files.
    #[test]
    fn an_alias_to_an_unknown_anchor_is_an_error_not_a_panic() {
        let pod = "apiVersion: v1\nkind: &a Pod\nmetadata: {name: p}\n";
        for (text, index) in [
            ("kind: *a\n".to_owned(), 1),
            ("[*a]\n".to_owned(), 1),
            ("{a: *b}\n".to_owned(), 1),
            ("*a\n".to_owned(), 1),
            (format!("{pod}---\nb: *c\nd: e\n"), 2),
            // Anchors do not reach across documents.
            (format!("{pod}---\nkind: *a\n"), 2),
        ] {
            match parse(&text) {
                Err(ManifestError::Syntax { index: i, message }) => {
                    assert_eq!(i, index, "{text:?}");
                    assert!(message.contains("unknown anchor"), "{text:?}: {message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("- 1\n---\nb: *c\n"),
            Err(ManifestError::NotAnObject { index: 1, line: 1 })
        ));
    }
}
