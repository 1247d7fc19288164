//! Per-sidecar push bookkeeping: which version was sent with which nonce, and what the
//! sidecar answered.
//!
//! Like Envoy's xDS, every Update carries a fresh nonce and the sidecar echoes it in its
//! Ack/Nack. An answer whose nonce is not the last one sent refers to an Update that has
//! already been superseded, so it says nothing about the sidecar's current state: it is
//! ignored (the caller logs it at debug level).

/// What the sidecar last said about the newest Update it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Sent, not answered yet (or nothing sent yet).
    Pending,
    /// The newest Update was applied.
    Ack,
    /// The newest Update was refused; the sidecar kept its last good snapshot.
    Nack,
}

impl SyncState {
    /// The name `sinewctl status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Pending => "PENDING",
            SyncState::Ack => "ACK",
            SyncState::Nack => "NACK",
        }
    }
}

/// How an Ack or Nack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It matched the last nonce sent and updated the state.
    Recorded,
    /// Its nonce is not the last one sent: ignored.
    Stale,
}

/// The version/nonce bookkeeping of one sidecar stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncTracker {
    pub sent_version: u64,
    pub last_nonce: String,
    pub applied_version: u64,
    pub state: SyncState,
    pub last_nack_error: String,
    pub last_nack_version: u64,
}

impl SyncTracker {
    /// A new stream; `applied_version` is what the sidecar said it had in its Hello.
    pub fn new(applied_version: u64) -> Self {
        SyncTracker {
            sent_version: 0,
            last_nonce: String::new(),
            applied_version,
            state: SyncState::Pending,
            last_nack_error: String::new(),
            last_nack_version: 0,
        }
    }

    /// An Update was queued for the sidecar. Versions never go backwards.
    pub fn on_sent(&mut self, version: u64, nonce: &str) {
        self.sent_version = self.sent_version.max(version);
        self.last_nonce = nonce.to_string();
        self.state = SyncState::Pending;
    }

    pub fn on_ack(&mut self, version: u64, nonce: &str) -> Answer {
        if !self.is_current(nonce) {
            return Answer::Stale;
        }
        self.applied_version = self.applied_version.max(version);
        self.state = SyncState::Ack;
        Answer::Recorded
    }

    pub fn on_nack(&mut self, version: u64, nonce: &str, error: &str) -> Answer {
        if !self.is_current(nonce) {
            return Answer::Stale;
        }
        self.state = SyncState::Nack;
        self.last_nack_error = truncate(error, MAX_NACK_ERROR).to_string();
        self.last_nack_version = version;
        Answer::Recorded
    }

    /// The control plane did not send `version`: it was larger than a sidecar decodes. Shown
    /// like a NACK; an answer to an Update sent before says nothing of the sidecar's state now.
    pub fn on_refused(&mut self, version: u64, error: &str) {
        self.last_nonce.clear();
        self.state = SyncState::Nack;
        self.last_nack_error = truncate(error, MAX_NACK_ERROR).to_string();
        self.last_nack_version = version;
    }

    fn is_current(&self, nonce: &str) -> bool {
        !self.last_nonce.is_empty() && self.last_nonce == nonce
    }
}

/// NACK errors are kept (and shown by `sinewctl status`) up to this many bytes.
pub const MAX_NACK_ERROR: usize = 4096;

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A fresh nonce: random, short, printable. Not a secret, only a correlation id.
pub fn new_nonce() -> String {
    let mut rng = fastrand::Rng::new();
    (0..16).map(|_| rng.alphanumeric()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ack_of_the_last_nonce_is_recorded() {
        let mut t = SyncTracker::new(0);
        assert_eq!(t.state, SyncState::Pending);
        t.on_sent(3, "n1");
        assert_eq!(t.on_ack(3, "n1"), Answer::Recorded);
        assert_eq!(
            (t.state, t.applied_version, t.sent_version),
            (SyncState::Ack, 3, 3)
        );
    }

    #[test]
    fn stale_answers_are_ignored() {
        let mut t = SyncTracker::new(0);
        assert_eq!(t.on_ack(1, ""), Answer::Stale, "nothing sent yet");
        t.on_sent(3, "n1");
        t.on_sent(5, "n2");
        assert_eq!(t.on_ack(3, "n1"), Answer::Stale);
        assert_eq!(t.on_nack(3, "n1", "bad"), Answer::Stale);
        assert_eq!((t.state, t.applied_version), (SyncState::Pending, 0));
    }

    #[test]
    fn nack_keeps_the_applied_version_and_records_the_error() {
        let mut t = SyncTracker::new(0);
        t.on_sent(3, "n1");
        t.on_ack(3, "n1");
        t.on_sent(4, "n2");
        assert_eq!(t.on_nack(4, "n2", "spec.timeout: bad"), Answer::Recorded);
        assert_eq!(t.state, SyncState::Nack);
        assert_eq!(t.applied_version, 3);
        assert_eq!(
            (t.last_nack_version, t.last_nack_error.as_str()),
            (4, "spec.timeout: bad")
        );
        // A later Update makes it pending again; the last NACK stays visible.
        t.on_sent(5, "n3");
        assert_eq!(t.state, SyncState::Pending);
        assert_eq!(t.last_nack_version, 4);
    }

    #[test]
    fn an_update_not_sent_shows_like_a_nack_and_supersedes_answers_in_flight() {
        let mut t = SyncTracker::new(0);
        t.on_sent(3, "n1");
        t.on_refused(4, "too large");
        assert_eq!(t.state, SyncState::Nack);
        assert_eq!((t.last_nack_version, t.sent_version), (4, 3));
        assert_eq!(t.on_ack(3, "n1"), Answer::Stale);
        assert_eq!(t.state, SyncState::Nack);
    }

    #[test]
    fn versions_never_go_backwards() {
        let mut t = SyncTracker::new(7);
        t.on_sent(9, "a");
        t.on_sent(8, "b");
        assert_eq!(t.sent_version, 9);
        t.on_ack(2, "b");
        assert_eq!(t.applied_version, 7);
    }

    #[test]
    fn long_nack_errors_are_truncated_on_a_char_boundary() {
        let mut t = SyncTracker::new(0);
        t.on_sent(1, "n");
        let long = "é".repeat(MAX_NACK_ERROR);
        t.on_nack(1, "n", &long);
        assert!(t.last_nack_error.len() <= MAX_NACK_ERROR);
        assert!(t.last_nack_error.len() >= MAX_NACK_ERROR - 1);
    }

    #[test]
    fn nonces_differ() {
        let a = new_nonce();
        assert_eq!(a.len(), 16);
        assert_ne!(a, new_nonce());
    }
}
