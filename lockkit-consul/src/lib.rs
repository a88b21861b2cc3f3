//! # lockkit-consul
//!
//! The Consul (sessions and KV acquire) backend of lockkit. This crate is reserved and not yet implemented in this
//! version: `lockkit::connect` reports its URLs as unsupported until it lands.
