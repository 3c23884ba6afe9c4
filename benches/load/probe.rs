//! What the bench reads about a server from outside: CPU time and memory from /proc, and
//! fixity's own review-duration histogram from its /metrics endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times. USER_HZ is 100 in the Linux ABI on every
/// architecture this runs on; reading it would take a libc dependency for a constant.
const USER_HZ: f64 = 100.0;

/// User + system CPU time a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); field 3 is the first after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A `kB` line of /proc/<pid>/status (`VmRSS`, `VmHWM`), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: f64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak RSS (VmHWM) to the current RSS, so each phase reports its own peak.
/// Returns false where the kernel refuses (then the peak is since process start).
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A plain HTTP/1.0 GET (the health port): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The cumulative buckets of `fixity_review_duration_seconds`, summed over its `result` label:
/// (upper bound in seconds, count), ascending, `+Inf` last.
#[derive(Debug, Clone, Default)]
pub struct Buckets(pub Vec<(f64, u64)>);

impl Buckets {
    /// Scrapes fixity's /metrics.
    pub fn scrape(health: SocketAddr) -> Option<Self> {
        let (status, text) = http_get(health, "/metrics")?;
        (status == 200).then(|| Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let mut sums: Vec<(f64, u64)> = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("fixity_review_duration_seconds_bucket{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|v| v.trim_end_matches('"'));
            let bound = match le {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(b) => b,
                    Err(_) => continue,
                },
                None => continue,
            };
            let Ok(count) = value.trim().parse::<u64>() else {
                continue;
            };
            match sums.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, c)) => *c += count,
                None => sums.push((bound, count)),
            }
        }
        sums.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(sums)
    }

    /// What was observed between `before` and `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(bound, count)| {
                    let earlier = before
                        .0
                        .iter()
                        .find(|(b, _)| *b == bound)
                        .map_or(0, |(_, c)| *c);
                    (bound, count.saturating_sub(earlier))
                })
                .collect(),
        )
    }

    /// Both sets of observations together (the same buckets).
    pub fn plus(&self, other: &Self) -> Self {
        let mut sum = self.clone();
        for &(bound, count) in &other.0 {
            match sum.0.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, c)) => *c += count,
                None => sum.0.push((bound, count)),
            }
        }
        sum.0.sort_by(|a, b| a.0.total_cmp(&b.0));
        sum
    }

    pub fn total(&self) -> u64 {
        self.0.last().map_or(0, |(_, c)| *c)
    }

    /// The smallest bucket bound that holds at least `q` of the observations: the quantile is
    /// at most this (the buckets are coarse, so this is an upper bound, not an estimate).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let wanted = (q * total as f64).ceil() as u64;
        self.0
            .iter()
            .find(|(_, c)| *c >= wanted)
            .map(|(bound, _)| *bound)
    }

    /// The share of observations above `bound` seconds (which must be a bucket bound).
    pub fn share_above(&self, bound: f64) -> Option<f64> {
        let total = self.total();
        let within = self.0.iter().find(|(b, _)| *b == bound)?.1;
        (total > 0).then(|| (total - within) as f64 / total as f64)
    }
}
