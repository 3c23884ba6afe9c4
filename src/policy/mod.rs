//! Policies: the `ImmutabilityPolicy` type, its validation, where policies come from, and the
//! pure evaluator that turns a request into a decision.

pub mod compile;
pub mod crd;
pub mod evaluate;
pub mod files;
pub mod glob;
pub mod identity;
pub mod refs;
pub mod store;
pub mod watch;

pub use compile::{CompiledPolicy, PolicyError};
pub use crd::{ImmutabilityPolicy, ImmutabilityPolicySpec, Mode};
pub use evaluate::{Decision, Intent, Outcome, Reason, Subject, Violation, evaluate};
pub use store::PolicyStore;

/// Name of the policy fixity applies when it is given none.
pub const BUILTIN_POLICY_NAME: &str = "fixity-default";

/// The embedded default: digests required; exec, attach, ephemeral containers and in-place
/// image changes denied; port-forward allowed; enforced everywhere.
pub fn builtin() -> CompiledPolicy {
    CompiledPolicy::from_spec(
        BUILTIN_POLICY_NAME.to_owned(),
        &ImmutabilityPolicySpec::default(),
    )
    .unwrap_or_else(|e| unreachable!("the built-in policy is valid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::crd::Action;

    #[test]
    fn builtin_policy_is_the_documented_default() {
        let p = super::builtin();
        assert_eq!(p.mode, super::Mode::Enforce);
        assert!(p.require_digest);
        assert!(p.allowed_registries.is_empty());
        assert_eq!(p.runtime.exec, Action::Deny);
        assert_eq!(p.runtime.attach, Action::Deny);
        assert_eq!(p.runtime.port_forward, Action::Allow);
        assert_eq!(p.runtime.ephemeral_containers, Action::Deny);
        assert_eq!(p.runtime.image_updates, Action::Deny);
        assert!(p.selector.is_none() && p.exclude_namespaces.is_empty());
    }
}
