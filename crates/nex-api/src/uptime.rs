//! Durations in the nats-server style used by Nex: `5s`, `4m5s`, `2d3h4m5s`, `1y2d3h4m5s`.

use std::time::Duration;

/// Formats `d` the way `uptime` fields are written, dropping leading zero units.
pub fn format(d: Duration) -> String {
    let mut s = d.as_secs();
    let years = s / (365 * 86400);
    s %= 365 * 86400;
    let days = s / 86400;
    s %= 86400;
    let hours = s / 3600;
    s %= 3600;
    let mins = s / 60;
    let secs = s % 60;
    if years > 0 {
        format!("{years}y{days}d{hours}h{mins}m{secs}s")
    } else if days > 0 {
        format!("{days}d{hours}h{mins}m{secs}s")
    } else if hours > 0 {
        format!("{hours}h{mins}m{secs}s")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Formats a cumulative function run time: `<n>ns` under 1 µs, `<n>ms` under 1 s, else [`format`].
pub fn format_runtime(d: Duration) -> String {
    if d < Duration::from_micros(1) {
        format!("{}ns", d.as_nanos())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_leading_zero_units() {
        assert_eq!(format(Duration::from_secs(5)), "5s");
        assert_eq!(format(Duration::from_secs(245)), "4m5s");
        assert_eq!(format(Duration::from_secs(3 * 3600 + 245)), "3h4m5s");
        assert_eq!(format(Duration::from_secs(2 * 86400 + 3 * 3600 + 245)), "2d3h4m5s");
        assert_eq!(format(Duration::from_secs(365 * 86400 + 2 * 86400 + 3 * 3600 + 245)), "1y2d3h4m5s");
        assert_eq!(format_runtime(Duration::from_nanos(500)), "500ns");
        assert_eq!(format_runtime(Duration::from_millis(12)), "12ms");
    }
}
