//! Journal retention (pure): which entries are old enough to purge.

/// How long the journal and the activity history are kept, in days (0: forever).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `event_retention_days`.
    pub journal_days: u64,
    /// `activity_retention_days`.
    pub activity_days: u64,
}

/// How often the purge runs.
pub const PURGE_EVERY_MS: u64 = 3_600_000;

/// Entries received before the returned time (unix ms) are purged; `None` keeps everything
/// (`event_retention_days = 0`).
pub fn cutoff(now: u64, retention_days: u64) -> Option<u64> {
    (retention_days > 0).then(|| now.saturating_sub(retention_days.saturating_mul(86_400_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_rules() {
        assert_eq!(cutoff(100 * 86_400_000, 90), Some(10 * 86_400_000));
        assert_eq!(cutoff(5, 90), Some(0), "a young clock purges nothing");
        assert_eq!(cutoff(100 * 86_400_000, 0), None, "0 keeps forever");
    }
}
