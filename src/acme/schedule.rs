//! When to renew: pure functions of the certificate's lifetime, the CA's
//! renewal window (ARI, RFC 9773), past failures and a random draw. No clock,
//! no I/O: the caller passes `now` and the draw, so every rule has a table test.

use std::time::{Duration, SystemTime};

/// The first retry after a failure; doubled per failure up to [`BACKOFF_MAX`].
/// Five minutes keeps a broken setup under Let's Encrypt's five failed
/// validations per name per hour.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5 * 60);
pub const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);

/// How often to ask for the ARI window when the CA sends no usable
/// `Retry-After` (RFC 9773 §4.3.3 suggests six hours).
pub const ARI_POLL_DEFAULT: Duration = Duration::from_secs(6 * 3600);
/// Bounds on the CA's `Retry-After` for ARI: never a busy loop, never a
/// window missed for days.
const ARI_POLL_MIN: Duration = Duration::from_secs(1);
const ARI_POLL_MAX: Duration = Duration::from_secs(24 * 3600);

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The CA's suggested renewal window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
}

/// When to renew a certificate that is being served: at the `draw` (0..1)
/// point of the CA's window where it gives one (fixed by the window, so
/// re-asking does not drift it towards the end), otherwise when
/// `renew_before` (default: a third of the lifetime, at most half of it, so a
/// fresh certificate is never due at once) is left. Never earlier than `now`.
pub fn renewal_time(
    now: SystemTime,
    life: Lifetime,
    window: Option<Window>,
    renew_before: Option<Duration>,
    draw: f64,
) -> SystemTime {
    let draw = draw.clamp(0.0, 1.0);
    if let Some(w) = window.filter(|w| w.end > w.start) {
        let span = w.end.duration_since(w.start).unwrap_or_default();
        return (w.start + span.mul_f64(draw)).max(now);
    }
    let lifetime = life
        .not_after
        .duration_since(life.not_before)
        .unwrap_or_default();
    let before = renew_before.unwrap_or(lifetime / 3).min(lifetime / 2);
    let at = life.not_after.checked_sub(before).unwrap_or(now);
    at.max(now)
}

/// How this machine's clock disagrees with a certificate issued at
/// `issued` (by this clock), if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skew {
    /// Due for renewal the moment it was issued: the clock is ahead of the
    /// CA's, and every new certificate will look due.
    Ahead,
    /// Not valid for another hour: the clock is behind (harmless to the
    /// schedule, worth saying).
    Behind,
}

pub fn skew(issued: SystemTime, life: Lifetime, renew_before: Option<Duration>) -> Option<Skew> {
    if renewal_time(issued, life, None, renew_before, 0.0) <= issued {
        Some(Skew::Ahead)
    } else if life.not_before > issued + FLOOR_MIN {
        Some(Skew::Behind)
    } else {
        None
    }
}

/// The least time between an issuance and the next order a host places of
/// its own accord. An hour: a CA whose renewal window (ARI) for a brand-new
/// certificate is already over cannot make it order in a loop, and a CA that
/// really wants a certificate replaced gets it within the hour. With the
/// clock [`Skew::Ahead`] every new certificate looks due, so the wait is a
/// tenth of the lifetime (nine days for 90-day certificates, 16 hours for
/// 160-hour ones) until the clock is fixed.
pub fn floor(life: Lifetime, skew: Option<Skew>) -> Duration {
    if skew != Some(Skew::Ahead) {
        return FLOOR_MIN;
    }
    let lifetime = life
        .not_after
        .duration_since(life.not_before)
        .unwrap_or_default();
    (lifetime / 10).max(FLOOR_MIN)
}

/// The shortest [`floor`].
pub const FLOOR_MIN: Duration = Duration::from_secs(3600);

/// The wait before retry number `failures` (1 = after the first failure):
/// exponential from [`BACKOFF_MIN`], capped at [`BACKOFF_MAX`], spread ±20 %
/// by `draw` (0..1) so many hosts that failed together do not retry together.
pub fn backoff(failures: u32, draw: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.4 * draw.clamp(0.0, 1.0))
}

/// When to ask for the ARI window again, from the CA's `Retry-After` delay.
/// A `Retry-After` of zero (or a date already past: clock skew) counts as
/// none, so a confused CA cannot make every host poll once a second.
pub fn ari_poll(now: SystemTime, retry_after: Option<Duration>) -> SystemTime {
    now + retry_after
        .filter(|d| !d.is_zero())
        .unwrap_or(ARI_POLL_DEFAULT)
        .clamp(ARI_POLL_MIN, ARI_POLL_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);
    const HOUR: Duration = Duration::from_secs(3600);

    fn t(days: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + DAY.mul_f64(days)
    }

    fn ninety_days_from(start: f64) -> Lifetime {
        Lifetime {
            not_before: t(start),
            not_after: t(start + 90.0),
        }
    }

    #[test]
    fn renewal_time_rules() {
        let life = ninety_days_from(0.0);
        let window = Window {
            start: t(60.0),
            end: t(62.0),
        };
        // (case, now, window, renew_before, draw, expected)
        type Case = (
            &'static str,
            f64,
            Option<Window>,
            Option<Duration>,
            f64,
            SystemTime,
        );
        let cases: &[Case] = &[
            (
                "no ARI: a third of the lifetime left",
                1.0,
                None,
                None,
                0.5,
                t(60.0),
            ),
            (
                "no ARI: renew_before overrides",
                1.0,
                None,
                Some(10 * DAY),
                0.9,
                t(80.0),
            ),
            ("no ARI: already past due", 70.0, None, None, 0.5, t(70.0)),
            (
                "renew_before longer than the lifetime: at half of it",
                1.0,
                None,
                Some(365 * DAY),
                0.5,
                t(45.0),
            ),
            (
                "ARI: start of the window",
                1.0,
                Some(window),
                None,
                0.0,
                t(60.0),
            ),
            (
                "ARI: middle of the window",
                1.0,
                Some(window),
                None,
                0.5,
                t(61.0),
            ),
            (
                "ARI: renew_before is ignored",
                1.0,
                Some(window),
                Some(DAY),
                0.5,
                t(61.0),
            ),
            (
                "ARI: the point does not drift",
                60.5,
                Some(window),
                None,
                0.5,
                t(61.0),
            ),
            (
                "ARI: the point passed, now",
                61.5,
                Some(window),
                None,
                0.5,
                t(61.5),
            ),
            (
                "ARI: window over, now",
                63.0,
                Some(window),
                None,
                0.5,
                t(63.0),
            ),
            (
                "ARI: an empty window is ignored",
                1.0,
                Some(Window {
                    start: t(62.0),
                    end: t(60.0),
                }),
                None,
                0.5,
                t(60.0),
            ),
        ];
        for (case, now, window, before, draw, want) in cases {
            let got = renewal_time(t(*now), life, *window, *before, *draw);
            assert_eq!(got, *want, "{case}");
        }
    }

    #[test]
    fn short_lived_certificates_renew_at_a_third_too() {
        // Let's Encrypt's shortlived profile: 160 hours.
        let life = Lifetime {
            not_before: t(0.0),
            not_after: t(0.0) + 160 * HOUR,
        };
        let at = renewal_time(t(0.0), life, None, None, 0.0);
        assert_eq!(at.duration_since(t(0.0)).unwrap().as_secs(), 320 * 3600 / 3);
    }

    #[test]
    fn after_an_issuance_the_next_order_waits_at_least_the_floor() {
        let hours = |d: Duration| d.as_secs_f64() / 3600.0;
        let ahead = Some(Skew::Ahead);
        let life = ninety_days_from(0.0);
        assert_eq!(hours(floor(life, None)), 1.0);
        assert_eq!(hours(floor(life, Some(Skew::Behind))), 1.0);
        assert_eq!(hours(floor(life, ahead)), 9.0 * 24.0, "a tenth of 90 days");
        let short = Lifetime {
            not_before: t(0.0),
            not_after: t(0.0) + 160 * HOUR,
        };
        assert_eq!(hours(floor(short, ahead)), 16.0);
        let tiny = Lifetime {
            not_before: t(0.0),
            not_after: t(0.0) + 5 * HOUR,
        };
        assert_eq!(hours(floor(tiny, ahead)), 1.0, "at least an hour");
        let upside_down = Lifetime {
            not_before: t(1.0),
            not_after: t(0.0),
        };
        assert_eq!(hours(floor(upside_down, ahead)), 1.0);
    }

    #[test]
    fn a_clock_the_certificate_does_not_fit_is_skewed() {
        let life = ninety_days_from(2.0);
        // (issued at day, by this clock; skew)
        for (issued, want) in [
            (2.0, None),
            (3.0, None),
            (1.98, None), // the CA backdates not_before: fine
            (61.0, None),
            (62.0, Some(Skew::Ahead)), // due at once
            (1102.0, Some(Skew::Ahead)),
            (1.0, Some(Skew::Behind)), // not valid for a day yet
        ] {
            assert_eq!(skew(t(issued), life, None), want, "issued at day {issued}");
        }
        assert_eq!(
            skew(t(48.0), life, Some(60 * DAY)),
            Some(Skew::Ahead),
            "renew_before counts (up to half)"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_a_cap() {
        let mins = |d: Duration| d.as_secs_f64() / 60.0;
        assert_eq!(mins(backoff(1, 0.5)), 5.0);
        assert_eq!(mins(backoff(2, 0.5)), 10.0);
        assert_eq!(mins(backoff(3, 0.5)), 20.0);
        assert_eq!(mins(backoff(1, 0.0)), 4.0, "-20 %");
        assert_eq!(mins(backoff(1, 1.0)), 6.0, "+20 %");
        assert_eq!(backoff(8, 0.5), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 0.5), BACKOFF_MAX, "no overflow");
        assert_eq!(backoff(0, 0.5), BACKOFF_MIN);
    }

    #[test]
    fn ari_polls_follow_retry_after_within_bounds() {
        let now = t(0.0);
        assert_eq!(ari_poll(now, Some(HOUR)), now + HOUR);
        assert_eq!(ari_poll(now, None), now + ARI_POLL_DEFAULT);
        assert_eq!(ari_poll(now, Some(Duration::ZERO)), now + ARI_POLL_DEFAULT);
        assert_eq!(
            ari_poll(now, Some(Duration::from_millis(10))),
            now + ARI_POLL_MIN
        );
        assert_eq!(ari_poll(now, Some(30 * DAY)), now + ARI_POLL_MAX);
    }
}
