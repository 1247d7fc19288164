//! Choosing an endpoint: power of two choices (P2C) by peak-EWMA latency × in-flight load.
//!
//! Why this pair (Finagle's and Linkerd's choice, and tower's):
//! - **P2C** draws two endpoints at random and takes the cheaper. It needs no global view
//!   and no sort, costs O(1) per request, and avoids the herd behaviour of "always the least
//!   loaded": many callers with slightly stale costs would all pick the same "best" endpoint
//!   at once, while two random candidates spread them. The worst endpoint is never chosen
//!   while any other exists.
//! - **Peak EWMA** reacts at once to a slow answer (a sample above the estimate replaces it)
//!   and forgets slowly, so a slow instance loses traffic within one request and wins it back
//!   only gradually. Multiplying by `in_flight + 1` counts queueing we have not yet measured:
//!   an endpoint that is fast but already busy looks as expensive as it is about to be.
//!
//! Both are pure: the caller passes `now` and the randomness, so tests step time by hand.

pub mod ewma;
pub mod p2c;

pub use ewma::{DECAY, DEFAULT_RTT, PeakEwma};
pub use p2c::pick;
