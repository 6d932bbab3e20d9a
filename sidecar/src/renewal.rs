//! When to renew and when to retry: small pure functions of times passed in.

use std::time::Duration;

use time::OffsetDateTime;

/// Certificates shorter-lived than this renew at half their lifetime instead of at two thirds.
pub const SHORT_LIVED: Duration = Duration::from_secs(10 * 24 * 3600);

/// Retry delays after the 1st, 2nd and 3rd consecutive failure; later failures wait a day.
pub const RETRY_STEPS: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(6000),
];

/// The delay after the 4th and later consecutive failures.
pub const RETRY_DAILY: Duration = Duration::from_secs(24 * 3600);

/// The share of a retry delay added as random jitter, at most.
pub const RETRY_JITTER: f64 = 0.1;

/// When a certificate valid from `not_before` to `not_after` should be renewed, without ARI.
///
/// Renewal starts when a third of the lifetime is left, or half of it for certificates that
/// live less than [`SHORT_LIVED`]. A time already past is returned as `now`.
pub fn renew_at(
    now: OffsetDateTime,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> OffsetDateTime {
    let lifetime: time::Duration = not_after - not_before;
    let left_at_renewal: time::Duration = if lifetime < SHORT_LIVED {
        lifetime / 2
    } else {
        lifetime / 3
    };
    let at: OffsetDateTime = not_after - left_at_renewal;
    at.max(now)
}

/// A point inside the CA's ARI suggested window (RFC 9773 §4.2), or `now` if it has started.
///
/// `fraction` (0.0..1.0) picks the point; callers pass a random value, as RFC 9773 §4.2 asks.
pub fn ari_renew_at(
    now: OffsetDateTime,
    window_start: OffsetDateTime,
    window_end: OffsetDateTime,
    fraction: f64,
) -> OffsetDateTime {
    if window_start <= now {
        return now;
    }
    let span = (window_end - window_start).max(time::Duration::ZERO);
    window_start + span * fraction.clamp(0.0, 1.0)
}

/// When to try again after `failures` consecutive failed attempts (1 for the first failure).
///
/// 1 min, 10 min, 100 min, then daily; `jitter` (0.0..1.0) adds up to [`RETRY_JITTER`] of the
/// delay. A later `Retry-After` from the CA wins.
pub fn retry_at(
    now: OffsetDateTime,
    failures: u32,
    jitter: f64,
    retry_after: Option<OffsetDateTime>,
) -> OffsetDateTime {
    let base = match failures {
        0 => Duration::ZERO,
        n => RETRY_STEPS
            .get(n as usize - 1)
            .copied()
            .unwrap_or(RETRY_DAILY),
    };
    let delay = base.mul_f64(1.0 + RETRY_JITTER * jitter.clamp(0.0, 1.0));
    let ours = now + delay;
    match retry_after {
        Some(ca) if ca > ours => ca,
        _ => ours,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    #[test]
    fn ninety_day_certificate_renews_with_thirty_days_left() {
        let not_before = NOW;
        let not_after = NOW + Duration::from_secs(90 * 86400);
        assert_eq!(
            renew_at(NOW, not_before, not_after),
            NOW + Duration::from_secs(60 * 86400)
        );
    }

    #[test]
    fn six_day_certificate_renews_at_half_life() {
        let not_after = NOW + Duration::from_secs(6 * 86400);
        assert_eq!(
            renew_at(NOW, NOW, not_after),
            NOW + Duration::from_secs(3 * 86400)
        );
    }

    #[test]
    fn overdue_renewal_is_now() {
        let not_before = NOW - Duration::from_secs(89 * 86400);
        let not_after = NOW + Duration::from_secs(86400);
        assert_eq!(renew_at(NOW, not_before, not_after), NOW);
    }

    #[test]
    fn ari_window_in_future_picks_point_inside() {
        let start = NOW + Duration::from_secs(3600);
        let end = NOW + Duration::from_secs(7200);
        assert_eq!(
            ari_renew_at(NOW, start, end, 0.5),
            NOW + Duration::from_secs(5400)
        );
        assert_eq!(
            ari_renew_at(start + Duration::from_secs(1), start, end, 0.5),
            start + Duration::from_secs(1)
        );
    }

    #[test]
    fn retries_step_one_ten_hundred_minutes_then_daily() {
        let delays: Vec<_> = (1..=5).map(|n| retry_at(NOW, n, 0.0, None) - NOW).collect();
        assert_eq!(
            delays,
            [60, 600, 6000, 86400, 86400].map(time::Duration::seconds)
        );
    }

    #[test]
    fn jitter_adds_at_most_ten_percent() {
        let delay = retry_at(NOW, 2, 1.0, None) - NOW;
        assert_eq!(delay, time::Duration::seconds(660));
        let delay = retry_at(NOW, 2, 0.5, None) - NOW;
        assert_eq!(delay, time::Duration::seconds(630));
    }

    #[test]
    fn later_retry_after_from_ca_wins() {
        let ca = NOW + Duration::from_secs(3600);
        assert_eq!(retry_at(NOW, 1, 0.0, Some(ca)), ca);
        let early = NOW + Duration::from_secs(10);
        assert_eq!(
            retry_at(NOW, 1, 0.0, Some(early)),
            NOW + Duration::from_secs(60)
        );
    }
}
