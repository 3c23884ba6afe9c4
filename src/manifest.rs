//! Reading Kubernetes manifests: multi-document YAML or JSON, with `List` kinds flattened.

use serde::Deserialize;
use serde_json::Value;

/// Why a manifest cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML or JSON: {message}")]
    Syntax { index: usize, message: String },
    #[error(
        "document {index}: not a Kubernetes object (expected a mapping with apiVersion and kind)"
    )]
    NotAnObject { index: usize },
}

/// One Kubernetes object from a manifest, with its 1-based document number.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub index: usize,
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
    let mut documents = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(de).map_err(|e| ManifestError::Syntax {
            index,
            message: e.to_string(),
        })?;
        match value {
            Value::Null => {}
            Value::Object(_) => push_object(&mut documents, index, value)?,
            _ => return Err(ManifestError::NotAnObject { index }),
        }
    }
    Ok(documents)
}

fn push_object(out: &mut Vec<Document>, index: usize, object: Value) -> Result<(), ManifestError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let has_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty());
    if kind.is_empty() || !has_version {
        return Err(ManifestError::NotAnObject { index });
    }
    if kind.ends_with("List") {
        if let Some(Value::Array(items)) = object.get("items") {
            for item in items {
                push_object(out, index, item.clone())?;
            }
            return Ok(());
        }
    }
    out.push(Document { index, object });
    Ok(())
}

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

    #[test]
    fn json_is_accepted() {
        let docs = parse(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"}}"#).unwrap();
        assert_eq!(docs[0].name(), "j");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            parse("just some words"),
            Err(ManifestError::NotAnObject { index: 1 })
        ));
        assert!(matches!(
            parse("a: [1, 2"),
            Err(ManifestError::Syntax { index: 1, .. })
        ));
        assert!(matches!(
            parse("kind: Pod\n"),
            Err(ManifestError::NotAnObject { index: 1 })
        ));
        assert!(matches!(
            parse("apiVersion: v1\nkind: Pod\n---\n- 1\n"),
            Err(ManifestError::NotAnObject { index: 2 })
        ));
        assert!(parse("").unwrap().is_empty());
    }
}
