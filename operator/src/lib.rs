//! mtproto-operator: reconciles `MtprotoGateway` objects into running gateway fleets.
//!
//! The reconciler is a pipeline: dereference (read Secrets) → [`validate`] (pure) →
//! [`build`] (pure) → apply (server-side apply) → [`conditions`] → status; see [`controller`].

pub mod build;
pub mod certs;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod validate;

#[cfg(test)]
mod fixtures;
