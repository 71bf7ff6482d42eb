//! Where auth keys live: the cache in front of the key source, and the stores.

pub mod cache;
pub mod redis_store;
pub mod sql;
pub mod store;
pub mod tiered;
