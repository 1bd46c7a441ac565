//! End-to-end tests against the real control plane. One test binary, so one control plane.

mod admission;
mod audit;
mod crds;
mod gateway;
mod healing;
mod monitoring;
mod operator;
mod replicas;
