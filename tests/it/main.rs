//! The integration tests that run the real binary against stand-ins, as
//! one test binary (one link step): a module per concern.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

#[path = "../support/mod.rs"]
mod support;

mod acme;
mod balancing;
mod canonical_json;
mod cli;
mod compression;
mod edge;
mod federation_gate;
mod fuzz_corpus;
mod h2_abuse;
mod hostile;
mod layers;
mod monitoring;
mod operate_live;
mod operations;
mod routing;
mod scale_out;
mod sites;
mod systemd;
mod upstream_faults;
mod workers;
