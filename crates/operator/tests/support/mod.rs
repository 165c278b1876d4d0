//! Test support for the integration tier.
#![allow(dead_code)]

pub mod cluster;
