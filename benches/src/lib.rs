//! The load benchmarks' pieces: each contender's topology ([`contenders`]), the load
//! generator ([`load`]), what the machine and each process did meanwhile ([`sys`]), the
//! peers' certificates ([`certs`]) and the report ([`report`]).
#![allow(clippy::missing_panics_doc)]

pub mod certs;
pub mod contenders;
pub mod load;
pub mod report;
pub mod sys;
