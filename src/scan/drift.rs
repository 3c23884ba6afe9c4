//! Drift: what a container runs, by the digest its runtime reports in `imageID`, against what
//! its spec pins. A container pinned to one digest that runs another is `ImageDrift`; a
//! container on a mutable tag is what it is (`MutableTag`), and its `imageID` says which
//! digest the tag gave it.

use crate::image::{Digest, ImageReference};
use crate::policy::evaluate::ImageUse;

use super::inventory::Running;

/// The reason code of a drift finding.
pub const REASON: &str = "ImageDrift";

/// A container that runs another digest than its spec pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub container: String,
    pub pinned: String,
    pub running: String,
}

/// The digest an `imageID` names: `repository@sha256:...`, possibly behind a runtime scheme
/// (`docker-pullable://`). A bare `sha256:...` is the local image ID under some runtimes, not a
/// manifest digest, so it names nothing comparable.
pub fn running_digest(image_id: &str) -> Option<Digest<'_>> {
    let (_, digest) = image_id.rsplit_once('@')?;
    Digest::parse(digest).ok()
}

fn pinned(u: &ImageUse) -> Option<Digest<'_>> {
    u.reference.as_ref().ok().and_then(ImageReference::digest)
}

/// Containers of one pod whose running digest differs from the pinned one.
pub fn find(images: &[ImageUse], running: &[Running]) -> Vec<Drift> {
    running
        .iter()
        .filter_map(|r| {
            let spec = images.iter().find(|u| u.name() == r.container)?;
            let pinned = pinned(spec)?;
            let running = running_digest(&r.image_id)?;
            (running != pinned).then(|| Drift {
                container: r.container.clone(),
                pinned: pinned.to_string(),
                running: running.to_string(),
            })
        })
        .collect()
}

/// Whether any container of the pod has a pinned image and a comparable running digest, so
/// that a drift check means something for it.
pub fn comparable(images: &[ImageUse], running: &[Running]) -> bool {
    running.iter().any(|r| {
        running_digest(&r.image_id).is_some()
            && images
                .iter()
                .any(|u| u.name() == r.container && pinned(u).is_some())
    })
}

/// What an unpinned container runs, when its runtime says: for the `MutableTag` message.
pub fn tag_resolved_to<'a>(container: &str, running: &'a [Running]) -> Option<Digest<'a>> {
    running
        .iter()
        .find(|r| r.container == container)
        .and_then(|r| running_digest(&r.image_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::evaluate::Location;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn running(container: &str, image_id: &str) -> Running {
        Running {
            container: container.into(),
            image_id: image_id.into(),
        }
    }

    #[test]
    fn image_ids_name_digests_only_with_a_repository() {
        let digest = |id: &str| running_digest(id).map(|d| d.to_string());
        assert_eq!(
            digest(&format!("docker.io/library/nginx@{A}")).as_deref(),
            Some(A)
        );
        assert_eq!(
            digest(&format!("docker-pullable://nginx@{A}")).as_deref(),
            Some(A)
        );
        assert_eq!(digest(A), None, "a local image ID");
        assert_eq!(digest("nginx@sha256:abc"), None);
        assert_eq!(digest(""), None);
    }

    #[test]
    fn a_pinned_container_running_another_digest_drifts() {
        let images = vec![
            ImageUse::new(Location::Container, "web", Some(&format!("nginx@{A}"))),
            ImageUse::new(Location::Container, "side", Some(&format!("envoy@{A}"))),
            ImageUse::new(Location::InitContainer, "init", Some("busybox:1")),
        ];
        let statuses = vec![
            running("web", &format!("docker.io/library/nginx@{B}")),
            running("side", &format!("docker.io/library/envoy@{A}")),
            running("init", &format!("docker.io/library/busybox@{B}")),
        ];
        assert_eq!(
            find(&images, &statuses),
            vec![Drift {
                container: "web".into(),
                pinned: A.into(),
                running: B.into()
            }]
        );
        assert!(comparable(&images, &statuses));
        assert_eq!(
            tag_resolved_to("init", &statuses)
                .map(|d| d.to_string())
                .as_deref(),
            Some(B)
        );
        assert!(
            !comparable(&images[2..], &statuses[2..]),
            "a tag pins nothing"
        );
        assert!(find(&images, &[running("web", B)]).is_empty());
    }
}
