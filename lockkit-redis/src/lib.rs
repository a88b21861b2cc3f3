//! # lockkit-redis
//!
//! The Redis (single instance and RedLock) backend of lockkit. This crate is reserved and not yet implemented in this
//! version: `lockkit::connect` reports its URLs as unsupported until it lands.
