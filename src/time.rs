//! Instants ahead of now. A duration a user set (`Duration::MAX` is how many write "no
//! limit") ends far in the future, never in an overflowing `Instant + Duration` (a panic).

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: as far as tokio's own "far future".
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d`, or far in the future when that does not fit an `Instant`.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| now + FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_too_long_for_an_instant_is_far_away() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(after(now, Duration::MAX) >= now + FAR);
    }
}
