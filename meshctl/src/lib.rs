//! meshctl, the operator's CLI: registry calls with the operator credentials written by
//! `mesh-registry init` (client and credentials from `mesh-client`), reads of a node's admin
//! endpoint, and the text helpers the commands share (aligned columns, short durations). Each command group with
//! decisions or formats of its own has a module here: [`policy`], [`gossip_key`], [`token`]
//! (join tokens), [`topology`] (the service graph), [`slo`] (SLO status) and [`check`] (the
//! mesh health verdict).

use std::time::Duration;

pub use mesh_client::DEFAULT_TIMEOUT;
pub use mesh_client::admin::{get as admin_get, print_members, print_services};
pub use mesh_client::credentials::{Credentials, DEFAULT_CREDENTIALS_DIR};

pub mod check;
pub mod gossip_key;
pub mod policy;
pub mod revoke;
pub mod slo;
pub mod token;
pub mod topology;

/// `3h12m ago` or `in 21h`.
pub fn when(unix: i64, now_unix: i64) -> String {
    let d = short_duration(Duration::from_secs((now_unix - unix).unsigned_abs()));
    if unix <= now_unix {
        format!("{d} ago")
    } else {
        format!("in {d}")
    }
}

/// Rows under a header, each column as wide as its widest cell (counted in characters, so
/// names with non-ASCII letters still line up), three spaces apart, the last column unpadded.
/// Rows shorter than the header leave their last cells empty.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            l.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str).take(widths.len()));
    }
    out
}

/// A duration in at most its two largest units, for people: `850ms`, `42s`, `12m3s`, `3h12m`,
/// `2d4h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) if s == 0 => format!("{}ms", d.as_millis()),
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) if secs == 0 => format!("{mins}m"),
        (0, 0, _) => format!("{mins}m{secs}s"),
        (0, _, 0) => format!("{hours}h"),
        (0, _, _) => format!("{hours}h{mins}m"),
        (_, 0, _) => format!("{days}d"),
        _ => format!("{days}d{hours}h"),
    }
}

/// The current time as Unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        for (d, want) in [
            (Duration::from_millis(0), "0ms"),
            (Duration::from_millis(850), "850ms"),
            (Duration::from_secs(42), "42s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(12 * 60 + 3), "12m3s"),
            (Duration::from_secs(3 * 3600), "3h"),
            (Duration::from_secs(3 * 3600 + 12 * 60 + 59), "3h12m"),
            (Duration::from_secs(2 * 86_400 + 59), "2d"),
            (Duration::from_secs(2 * 86_400 + 4 * 3600), "2d4h"),
        ] {
            assert_eq!(short_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn columns_line_up_by_characters() {
        let rows = vec![
            vec!["a".to_owned(), "ünïcode".to_owned(), "last".to_owned()],
            vec!["longer".to_owned(), "b".to_owned(), String::new()],
            vec!["short".to_owned()],
        ];
        assert_eq!(
            columns(&["X", "Y", "Z"], &rows),
            "X        Y         Z\n\
             a        ünïcode   last\n\
             longer   b\n\
             short\n"
        );
        assert_eq!(columns(&["ONLY"], &[]), "ONLY\n");
    }
}
