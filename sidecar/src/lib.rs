//! Sinew sidecar.
#![forbid(unsafe_code)]
