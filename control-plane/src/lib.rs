//! Sinew control plane.
#![forbid(unsafe_code)]
