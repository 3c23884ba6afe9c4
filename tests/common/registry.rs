//! A throwaway OCI registry (`crane registry serve`) and the real `cosign` CLI, for tests that
//! need signed images. The tools are the pinned builds of `tests/tools/build.sh registry
//! cosign` (cached); a test fails, never skips, when they cannot be built.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
        let key_path = key.private.to_str().unwrap();
        let mut args = vec![
            "sign",
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
