//! Certificates fixity manages itself: a CA and serving certificate kept in a Secret, the CA
//! written into the webhook configuration's caBundle, and renewal well before expiry. Every
//! replica serves what the Secret holds; one replica at a time (a Lease) writes it.

pub mod issue;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::ServerConfig;
use time::OffsetDateTime;

use crate::audit::Metrics;
use crate::lease::LeaseLock;
use crate::server::tls;
use issue::Pem;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const PREVIOUS_CA: &str = "ca-previous.crt";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
/// Records the names the serving certificate was issued for, so a change re-issues it.
const NAMES_ANNOTATION: &str = "fixity.dev/dns-names";

/// Why certificates could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the ValidatingWebhookConfiguration {0:?} does not exist")]
    NoWebhookConfiguration(String),
    #[error("another replica holds the certificate lease and the Secret is not usable yet")]
    Waiting,
}

/// Settings for self-managed certificates.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub secret: String,
    pub webhook_configuration: String,
    pub lease: String,
    /// Names the serving certificate is valid for.
    pub names: Vec<String>,
    /// Who this replica is, in the Lease.
    pub identity: String,
    pub validity: Duration,
    pub ca_validity: Duration,
    /// Whom the webhook port lets connect.
    pub client_auth: tls::ClientAuth,
}

impl Settings {
    /// The DNS names a Service gets in its namespace.
    pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
        vec![
            service.to_owned(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ]
    }
}

/// Keeps the Secret, the caBundle and the served certificate in step.
pub struct Manager {
    settings: Settings,
    secrets: Api<Secret>,
    webhooks: Api<ValidatingWebhookConfiguration>,
    lock: LeaseLock,
}

/// What the Secret holds, once read.
struct Stored {
    ca: Pem,
    previous_ca: Option<String>,
    serving: Pem,
    names: String,
}

impl Manager {
    pub fn new(client: Client, settings: Settings) -> Self {
        let lock = LeaseLock::new(
            Api::namespaced(client.clone(), &settings.namespace),
            settings.lease.clone(),
            settings.identity.clone(),
            Duration::from_secs(15),
        );
        Self {
            secrets: Api::namespaced(client.clone(), &settings.namespace),
            webhooks: Api::all(client),
            lock,
            settings,
        }
    }

    /// How often the Secret is looked at: often enough to renew in time.
    pub fn check_interval(&self) -> Duration {
        (self.settings.validity / 12).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Waits until a usable certificate exists (issuing it if this replica gets the lease)
    /// and returns the configuration to serve it with.
    pub async fn initial(&self) -> Result<(Arc<ServerConfig>, String), CertError> {
        let mut attempt = 0u32;
        loop {
            match self.reconcile().await {
                Ok(serving) => {
                    let config = to_config(&serving, &self.settings.client_auth)?;
                    return Ok((config, serving.cert));
                }
                Err(e) if attempt < 60 => {
                    attempt += 1;
                    tracing::info!(error = %e, "waiting for the serving certificate");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps reconciling and swaps the served certificate when the Secret changes.
    pub async fn run(self, rustls: RustlsConfig, mut served: String, metrics: Arc<Metrics>) {
        let mut ticker = tokio::time::interval(self.check_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reconcile().await {
                Ok(serving) if serving.cert != served => {
                    match to_config(&serving, &self.settings.client_auth) {
                        Ok(config) => {
                            rustls.reload_from_config(config);
                            served = serving.cert;
                            tls::count_reload(&metrics, Ok(()), &self.secret_name());
                        }
                        Err(e) => tls::count_reload(&metrics, Err(&e), &self.secret_name()),
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "certificate reconciliation failed; retrying"),
            }
        }
    }

    fn secret_name(&self) -> String {
        format!(
            "secret/{}/{}",
            self.settings.namespace, self.settings.secret
        )
    }

    /// Makes the Secret and caBundle right and returns the serving certificate to use.
    async fn reconcile(&self) -> Result<Pem, CertError> {
        let now = OffsetDateTime::now_utc();
        let (_, stored) = self.read().await?;
        if let Some(stored) = &stored
            && !self.needs_writing(stored, now)
        {
            self.ensure_ca_bundle(&bundle(stored, now)).await?;
            return Ok(stored.serving.clone());
        }
        if !self.lock.try_acquire().await? {
            // Keep serving what exists while the holder renews it.
            return stored.map(|s| s.serving).ok_or(CertError::Waiting);
        }
        let result = self.write(now).await;
        if let Err(e) = self.lock.release().await {
            tracing::warn!(error = %e, "could not release the certificate lease; it will expire");
        }
        result
    }

    async fn write(&self, now: OffsetDateTime) -> Result<Pem, CertError> {
        // Read again under the lease: another replica may have just written.
        let (secret, stored) = self.read().await?;
        if let Some(stored) = &stored
            && !self.needs_writing(stored, now)
        {
            self.ensure_ca_bundle(&bundle(stored, now)).await?;
            return Ok(stored.serving.clone());
        }
        let ca_usable = stored.as_ref().is_some_and(|s| {
            issue::validity(&s.ca.cert).is_ok_and(|(nb, na)| !issue::due_for_renewal(nb, na, now))
        });
        let (ca, previous_ca) = match &stored {
            Some(s) if ca_usable => (s.ca.clone(), s.previous_ca.clone()),
            Some(s) => {
                tracing::info!(
                    "issuing a new CA; the old one stays in the caBundle until it expires"
                );
                (
                    issue::new_ca("fixity webhook CA", now, self.settings.ca_validity)?,
                    Some(s.ca.cert.clone()),
                )
            }
            None => (
                issue::new_ca("fixity webhook CA", now, self.settings.ca_validity)?,
                None,
            ),
        };
        let serving = issue::serving(&ca, &self.settings.names, now, self.settings.validity)?;
        let stored = Stored {
            ca,
            previous_ca,
            serving,
            names: self.settings.names.join(","),
        };
        // The caBundle first: a replica that loads the new certificate is then already trusted.
        self.ensure_ca_bundle(&bundle(&stored, now)).await?;
        self.store(secret, &stored).await?;
        tracing::info!(secret = %self.secret_name(), names = %stored.names, "serving certificate issued");
        Ok(stored.serving)
    }

    fn needs_writing(&self, stored: &Stored, now: OffsetDateTime) -> bool {
        let due = |pem: &str| {
            issue::validity(pem).map_or(true, |(nb, na)| issue::due_for_renewal(nb, na, now))
        };
        stored.names != self.settings.names.join(",")
            || due(&stored.serving.cert)
            || due(&stored.ca.cert)
    }

    async fn read(&self) -> Result<(Option<Secret>, Option<Stored>), CertError> {
        let secret = self.secrets.get_opt(&self.settings.secret).await?;
        let stored = secret.as_ref().and_then(|s| {
            let data = s.data.as_ref()?;
            let text = |k: &str| {
                data.get(k)
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            };
            Some(Stored {
                ca: Pem {
                    cert: text(CA_CERT)?,
                    key: text(CA_KEY)?,
                },
                previous_ca: text(PREVIOUS_CA),
                serving: Pem {
                    cert: text(TLS_CERT)?,
                    key: text(TLS_KEY)?,
                },
                names: s
                    .metadata
                    .annotations
                    .as_ref()?
                    .get(NAMES_ANNOTATION)?
                    .clone(),
            })
        });
        Ok((secret, stored))
    }

    async fn store(&self, existing: Option<Secret>, stored: &Stored) -> Result<(), CertError> {
        let mut data = BTreeMap::from([
            (CA_CERT.to_owned(), bytes(&stored.ca.cert)),
            (CA_KEY.to_owned(), bytes(&stored.ca.key)),
            (TLS_CERT.to_owned(), bytes(&stored.serving.cert)),
            (TLS_KEY.to_owned(), bytes(&stored.serving.key)),
        ]);
        if let Some(previous) = &stored.previous_ca {
            data.insert(PREVIOUS_CA.to_owned(), bytes(previous));
        }
        let annotations = BTreeMap::from([(NAMES_ANNOTATION.to_owned(), stored.names.clone())]);
        let params = PostParams::default();
        match existing {
            Some(mut secret) => {
                secret.data = Some(data);
                secret
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .extend(annotations);
                // Carries the resourceVersion read: a concurrent writer makes this a conflict.
                self.secrets
                    .replace(&self.settings.secret, &params, &secret)
                    .await?;
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.settings.secret.clone()),
                        annotations: Some(annotations),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "fixity".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(data),
                    ..Default::default()
                };
                self.secrets.create(&params, &secret).await?;
            }
        }
        Ok(())
    }

    /// Writes `ca_bundle` into every webhook of the configuration that lacks it.
    async fn ensure_ca_bundle(&self, ca_bundle: &str) -> Result<(), CertError> {
        let name = &self.settings.webhook_configuration;
        let mut config = self
            .webhooks
            .get_opt(name)
            .await?
            .ok_or_else(|| CertError::NoWebhookConfiguration(name.clone()))?;
        let wanted = bytes(ca_bundle);
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
                webhook.client_config.ca_bundle = Some(wanted.clone());
                changed = true;
            }
        }
        if changed {
            self.webhooks
                .replace(name, &PostParams::default(), &config)
                .await?;
            tracing::info!(webhook_configuration = %name, "caBundle updated");
        }
        Ok(())
    }
}

/// The CAs clients must trust: the current one, and the previous one while it is valid.
fn bundle(stored: &Stored, now: OffsetDateTime) -> String {
    let mut bundle = stored.ca.cert.clone();
    if let Some(previous) = &stored.previous_ca
        && issue::validity(previous).is_ok_and(|(_, not_after)| not_after > now)
    {
        bundle.push_str(previous);
    }
    bundle
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn to_config(serving: &Pem, client_auth: &tls::ClientAuth) -> Result<Arc<ServerConfig>, CertError> {
    Ok(tls::server_config(
        serving.cert.as_bytes(),
        TLS_CERT,
        serving.key.as_bytes(),
        TLS_KEY,
        client_auth,
    )?)
}
