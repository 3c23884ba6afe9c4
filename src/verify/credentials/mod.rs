//! Registry credentials for signature checks, from the places the kubelet takes them: the
//! pod's pull secrets and its service account's (`pull_secrets`), and the kubelet's image
//! credential provider plugins (`providers`, configured as in `provider_config`, matched as in
//! `image_match`).

pub mod image_match;
pub mod provider_config;
pub mod providers;
pub mod pull_secrets;
