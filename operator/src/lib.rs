//! mtproto-operator: reconciles `MtprotoGateway` objects into running gateway fleets.

pub mod crd;
