//! A throwaway OCI registry (`crane registry serve`) and the real `cosign` CLI, for tests that
//! need signed images. The tools are the pinned builds of `tests/tools/build.sh registry
//! cosign` (cached); a test fails, never skips, when they cannot be built.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::Digest as _;

use fixity::image::ImageReference;
use fixity::verify::{Authority, RegistryOptions, Verified, Verifier, VerifyError};

/// `PATH` with the pinned crane and cosign first.
pub fn tool_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(["registry", "cosign"])
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} registry cosign failed: the pinned crane and cosign are required",
            script.display()
        );
        let dirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        format!(
            "{}:{}",
            dirs.join(":"),
            std::env::var("PATH").unwrap_or_default()
        )
    })
}

/// Runs a tool, panicking with its output when it fails.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("PATH", tool_path())
        .env("COSIGN_PASSWORD", "")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Any valid public key, for tests that never reach signature checking.
pub fn test_public_key() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    key.public_key_pem()
}

/// A throwaway registry, killed on drop.
pub struct Lab {
    dir: tempfile::TempDir,
    /// The registry process, when this lab started one.
    registry: Option<Child>,
    pub host: String,
    log: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.as_mut() {
            let _ = registry.kill();
            let _ = registry.wait();
        }
    }
}

/// A cosign key pair in the lab directory.
pub struct Key {
    pub private: PathBuf,
    pub public_pem: String,
}

impl Key {
    /// The public key's lines, each indented by `spaces`, for a YAML block scalar.
    pub fn pem_indented(&self, spaces: usize) -> String {
        self.public_pem
            .lines()
            .map(|l| format!("{:spaces$}{l}\n", ""))
            .collect()
    }

    /// The `spec` lines of an ImmutabilityPolicy that requires this key's signature on every
    /// image under `registry`.
    pub fn required_on(&self, registry: &str) -> String {
        let pem = self.pem_indented(10);
        format!(
            "images:\n  verify:\n  - images: ['{registry}/**']\n    authorities:\n    - key:\n        publicKey: |\n{pem}"
        )
    }
}

impl Lab {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("registry.log");
        let registry = Command::new("crane")
            .args(["registry", "serve", "--address", "127.0.0.1:0"])
            .env("PATH", tool_path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("crane registry serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = text
                .lines()
                .find_map(|l| l.split("serving on port ").nth(1))
            {
                break port.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "registry did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            dir,
            registry: Some(registry),
            host: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// A lab on a registry that is already running (its requests are not counted).
    pub fn existing(host: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("registry.log");
        Self {
            dir,
            registry: None,
            host: host.to_owned(),
            log,
        }
    }

    /// Stops the registry this lab started: from now on it is unreachable.
    pub fn stop_registry(&mut self) {
        if let Some(registry) = self.registry.as_mut() {
            let _ = registry.kill();
            let _ = registry.wait();
        }
        self.registry = None;
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Pushes a one-layer image whose file holds `content`; returns its digest.
    pub fn push_image(&self, repo: &str, tag: &str, content: &str) -> String {
        let work = self.path().join(format!("layer-{repo}-{tag}"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("content.txt"), content).unwrap();
        run(&work, "tar", &["cf", "layer.tar", "content.txt"]);
        let target = format!("{}/{repo}:{tag}", self.host);
        run(
            &work,
            "crane",
            &["append", "--insecure", "-f", "layer.tar", "-t", &target],
        );
        run(self.path(), "crane", &["digest", "--insecure", &target])
    }

    pub fn reference(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.host)
    }

    pub fn key(&self, name: &str) -> Key {
        let dir = self.path().join(format!("key-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        run(&dir, "cosign", &["generate-key-pair"]);
        Key {
            private: dir.join("cosign.key"),
            public_pem: std::fs::read_to_string(dir.join("cosign.pub")).unwrap(),
        }
    }

    /// Signs with cosign, offline; `classic` writes the `.sig` tag, else a Sigstore bundle.
    pub fn sign(&self, key: &Key, reference: &str, classic: bool, extra: &[&str]) {
        self.cosign_offline("sign", key, reference, classic, extra);
    }

    /// `cosign attest` with `key`, offline: `predicate` (JSON) of `kind` (a cosign `--type`
    /// or a URI); `classic` writes the `.att` tag, else a Sigstore bundle referrer.
    pub fn attest(&self, key: &Key, reference: &str, kind: &str, predicate: &str, classic: bool) {
        let path = self.path().join("predicate.json");
        std::fs::write(&path, predicate).unwrap();
        let extra = ["--type", kind, "--predicate", path.to_str().unwrap()];
        self.cosign_offline("attest", key, reference, classic, &extra);
    }

    /// `cosign COMMAND` with `key` and no transparency log.
    fn cosign_offline(
        &self,
        command: &str,
        key: &Key,
        reference: &str,
        classic: bool,
        extra: &[&str],
    ) {
        let key_path = key.private.to_str().unwrap();
        let mut args = vec![
            command,
            "--key",
            key_path,
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--allow-http-registry",
            "-y",
        ];
        if classic {
            args.push("--new-bundle-format=false");
        }
        args.extend_from_slice(extra);
        args.push(reference);
        run(self.path(), "cosign", &args);
    }

    /// PUTs `manifest` at `repo_ref:tag`, where `repo_ref` is `host/repo`.
    pub fn put_manifest(&self, reference: &str, manifest: &serde_json::Value) {
        let (repo, tag) = reference.rsplit_once(':').unwrap();
        let repo = repo.strip_prefix(&format!("{}/", self.host)).unwrap();
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json");
        let url = format!("http://{}/v2/{repo}/manifests/{tag}", self.host);
        self.curl_upload(&url, "PUT", media_type, manifest.to_string().as_bytes());
    }

    /// Uploads a blob in one request; returns its digest.
    pub fn put_blob(&self, repo: &str, content: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(content)));
        let url = format!(
            "http://{}/v2/{repo}/blobs/uploads/?digest={digest}",
            self.host
        );
        self.curl_upload(&url, "POST", "application/octet-stream", content);
        digest
    }

    fn curl_upload(&self, url: &str, method: &str, content_type: &str, body: &[u8]) {
        let path = self.path().join("upload.bin");
        std::fs::write(&path, body).unwrap();
        let status = Command::new("curl")
            .args(["-sf", "-X", method, "-H"])
            .arg(format!("Content-Type: {content_type}"))
            .arg("--data-binary")
            .arg(format!("@{}", path.display()))
            .arg(url)
            .status()
            .expect("curl");
        assert!(status.success(), "{method} {url}");
    }

    pub fn crane(&self, args: &[&str]) -> String {
        let mut all = vec!["--insecure"];
        all.extend_from_slice(args);
        run(self.path(), "crane", &all)
    }

    /// Registry requests logged so far (crane logs one line per request).
    pub fn logged_requests(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                ["GET ", "HEAD ", "PUT ", "POST ", "PATCH "]
                    .iter()
                    .any(|m| l.contains(m))
            })
            .count()
    }

    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            insecure_registries: vec![self.host.clone()],
            ..RegistryOptions::default()
        }
    }

    /// The Sigstore bundle attached to `reference` through the referrers tag (the first one),
    /// with the referrer manifest that holds it.
    pub fn bundle(&self, reference: &str) -> (serde_json::Value, serde_json::Value) {
        let (repo_ref, digest) = reference.split_once('@').unwrap();
        let index: serde_json::Value = serde_json::from_str(&self.crane(&[
            "manifest",
            &format!("{repo_ref}:{}", digest.replace(':', "-")),
        ]))
        .unwrap();
        let manifest: serde_json::Value = serde_json::from_str(&self.crane(&[
            "manifest",
            &format!(
                "{repo_ref}@{}",
                index["manifests"][0]["digest"].as_str().unwrap()
            ),
        ]))
        .unwrap();
        let bundle = serde_json::from_str(&self.crane(&[
            "blob",
            &format!(
                "{repo_ref}@{}",
                manifest["layers"][0]["digest"].as_str().unwrap()
            ),
        ]))
        .unwrap();
        (bundle, manifest)
    }

    /// Replaces the bundle attached to `reference` (bundle blob, referrer manifest and
    /// referrers tag), as someone with write access to the repository could.
    pub fn replace_bundle(&self, reference: &str, bundle: &serde_json::Value) {
        let (repo_ref, digest) = reference.split_once('@').unwrap();
        let repo = repo_ref.strip_prefix(&format!("{}/", self.host)).unwrap();
        let index_tag = format!("{repo_ref}:{}", digest.replace(':', "-"));
        let mut index: serde_json::Value =
            serde_json::from_str(&self.crane(&["manifest", &index_tag])).unwrap();
        let (_, mut manifest) = self.bundle(reference);
        let bundle = bundle.to_string();
        let layer_digest = self.put_blob(repo, bundle.as_bytes());
        manifest["layers"][0]["digest"] = layer_digest.into();
        manifest["layers"][0]["size"] = bundle.len().into();
        let manifest_bytes = manifest.to_string();
        let manifest_digest = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&manifest_bytes))
        );
        self.put_manifest(
            &format!("{repo_ref}:{}", manifest_digest.replace(':', "-")),
            &manifest,
        );
        index["manifests"][0]["digest"] = manifest_digest.into();
        index["manifests"][0]["size"] = manifest_bytes.len().into();
        self.put_manifest(&index_tag, &index);
    }

    pub async fn verify(
        &self,
        reference: &str,
        authorities: &[Authority],
    ) -> Result<Verified, VerifyError> {
        let verifier = Verifier::new(self.options()).unwrap();
        verifier
            .verify(&ImageReference::parse(reference).unwrap(), authorities)
            .await
    }
}

/// A registry front that demands a bearer token, issued at `/token` for `robot:s3cret` by
/// HTTP basic auth, and forwards authorised reads to `backend`. Returns its `host:port`.
pub async fn token_front(address: &str, backend: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let realm = format!("http://{host}/token");
    let good_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:s3cret")
    );
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&request).to_string();
            let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
            let header = |name: &str| {
                text.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default()
            };
            let (status, extra, body): (&str, String, Vec<u8>) = if path.starts_with("/token") {
                if header("authorization") == good_basic {
                    (
                        "200 OK",
                        String::new(),
                        br#"{"token":"tok-123","expires_in":300}"#.to_vec(),
                    )
                } else {
                    ("401 Unauthorized", String::new(), Vec::new())
                }
            } else if header("authorization") != "Bearer tok-123" {
                let challenge = format!(
                    "www-authenticate: Bearer realm=\"{realm}\",service=\"fixity-test\"\r\n"
                );
                ("401 Unauthorized", challenge, Vec::new())
            } else {
                let upstream = http
                    .get(format!("http://{backend}{path}"))
                    .header("accept", header("accept"))
                    .send()
                    .await
                    .unwrap();
                let status = match upstream.status().as_u16() {
                    200 => "200 OK",
                    404 => "404 Not Found",
                    _ => "502 Bad Gateway",
                };
                (
                    status,
                    String::new(),
                    upstream.bytes().await.unwrap().to_vec(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
        }
    });
    host
}
