//! fixity: a Kubernetes admission controller that keeps workloads immutable.
//!
//! The data path, top to bottom: [`server`] receives an AdmissionReview, [`admission`] reads it
//! and works out its intent, [`policy`] evaluates it against the policies in force (images parsed
//! by [`image`]), and [`audit`] records every violation.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admission;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod image;
pub mod lease;
pub mod manifest;
pub mod policy;
pub mod scan;
pub mod server;
pub mod verify;
