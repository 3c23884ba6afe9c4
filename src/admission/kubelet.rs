//! Paths under `nodes/proxy`: the API server forwards them to the node's kubelet, whose API
//! runs commands in containers (`/exec`, `/run`), attaches to them (`/attach`), forwards their
//! ports (`/portForward`), and more. The API server reviews each such request as CONNECT
//! `nodes/proxy`, with the kubelet path in a `NodeProxyOptions` object, whatever the HTTP verb.
//!
//! Only paths known to read (health, metrics, stats, pod lists, logs) pass; the streams are
//! judged by the policy's exec, attach and portForward rules; any other path is one fixity
//! cannot tell is harmless (`/checkpoint`, `/debug/flags/v`, a kubelet's next endpoint), so it
//! is denied.

use crate::policy::evaluate::{Connect, KubeletAccess};

/// Kubelet paths that only read. `/logs` reads the node's log files (with the NodeLogQuery
/// feature, through a fixed `journalctl`); `/containerLogs` is `kubectl logs`.
const READ_ONLY: [&str; 13] = [
    "healthz",
    "livez",
    "readyz",
    "metrics",
    "stats",
    "spec",
    "pods",
    "runningpods",
    "configz",
    "statusz",
    "flagz",
    "logs",
    "containerlogs",
];

/// What `path` (as the review carries it) does on the kubelet; `None` when it only reads.
pub fn classify(path: &str) -> Option<KubeletAccess> {
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            // Whatever resolves these (the API server, the kubelet's router) decides which
            // endpoint runs; fixity cannot, so it does not guess.
            ".." => return Some(KubeletAccess::Unknown),
            s if s.contains(['%', '\\']) || s.chars().any(char::is_control) => {
                return Some(KubeletAccess::Unknown);
            }
            s => segments.push(s),
        }
    }
    let Some(root) = segments.first().map(|s| s.to_ascii_lowercase()) else {
        return Some(KubeletAccess::Unknown);
    };
    let stream = |action| {
        let at = |i: usize| segments.get(i).map(|s| (*s).to_owned());
        Some(KubeletAccess::Stream {
            action,
            namespace: at(1),
            pod: at(2),
            // /exec/{namespace}/{pod}/{container} or /exec/{namespace}/{pod}/{uid}/{container}
            container: match (action, segments.len()) {
                (Connect::PortForward, _) => None,
                (_, 4) => at(3),
                (_, 5) => at(4),
                _ => None,
            },
        })
    };
    match root.as_str() {
        "exec" | "run" => stream(Connect::Exec),
        "attach" => stream(Connect::Attach),
        "portforward" => stream(Connect::PortForward),
        // The CRI streaming endpoints older kubelets served: a one-time token, no names.
        "cri" => {
            let action = match segments.get(1).map(|s| s.to_ascii_lowercase()).as_deref() {
                Some("exec") => Connect::Exec,
                Some("attach") => Connect::Attach,
                Some("portforward") => Connect::PortForward,
                _ => return Some(KubeletAccess::Unknown),
            };
            Some(KubeletAccess::Stream {
                action,
                namespace: None,
                pod: None,
                container: None,
            })
        }
        r if READ_ONLY.contains(&r) => None,
        _ => Some(KubeletAccess::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(action: Connect, ns: &str, pod: &str, container: Option<&str>) -> KubeletAccess {
        KubeletAccess::Stream {
            action,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            container: container.map(Into::into),
        }
    }

    #[test]
    fn streams_into_containers_name_what_the_path_names() {
        let cases = [
            (
                "/exec/ns/web/app",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "/exec/ns/web/0f3c-uid/app",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "/run/ns/web/app",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "/attach/ns/web/app",
                stream(Connect::Attach, "ns", "web", Some("app")),
            ),
            (
                "/portForward/ns/web",
                stream(Connect::PortForward, "ns", "web", None),
            ),
            (
                "/portForward/ns/web/0f3c-uid",
                stream(Connect::PortForward, "ns", "web", None),
            ),
            // As the API server passes them on, odd spellings included.
            (
                "/Exec/ns/web/app/",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "exec//ns/./web/app",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "/RUN/ns/web/app",
                stream(Connect::Exec, "ns", "web", Some("app")),
            ),
            (
                "/exec",
                KubeletAccess::Stream {
                    action: Connect::Exec,
                    namespace: None,
                    pod: None,
                    container: None,
                },
            ),
            (
                "/cri/exec/AbC123",
                KubeletAccess::Stream {
                    action: Connect::Exec,
                    namespace: None,
                    pod: None,
                    container: None,
                },
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(classify(path), Some(expected), "{path}");
        }
    }

    #[test]
    fn only_known_readers_pass() {
        for path in [
            "/healthz",
            "/metrics",
            "/metrics/cadvisor",
            "/metrics/resource",
            "/stats/summary",
            "/pods",
            "/runningpods/",
            "/spec/",
            "/configz",
            "/logs/",
            "/logs/kubelet.log",
            "/containerLogs/ns/web/app",
        ] {
            assert_eq!(classify(path), None, "{path}");
        }
        for path in [
            "",
            "/",
            "/checkpoint/ns/web/app",
            "/debug/flags/v",
            "/debug/pprof/profile",
            "/cri/unknown/x",
            "/metrics/../exec/ns/web/app",
            "/%65xec/ns/web/app",
            "/exec\\ns",
            "/something-new",
        ] {
            assert_eq!(classify(path), Some(KubeletAccess::Unknown), "{path:?}");
        }
    }
}
