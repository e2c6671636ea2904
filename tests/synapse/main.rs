//! The suites with a real Synapse from the test virtualenv behind the edge,
//! as one test binary; scripts/test runs it one test at a time (each starts
//! its own Synapse deployment, and several at once would crowd two cores).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

#[path = "../support/mod.rs"]
mod support;

mod doctor;
mod federation_e2e;
mod synapse_2026;
mod synapse_e2e;
mod synapse_mas_e2e;
mod synapse_workers_e2e;
