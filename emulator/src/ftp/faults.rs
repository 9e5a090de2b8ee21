//! The FTP server's fault knobs, switchable at runtime (`PUT /emulator/ftp/faults` on the plain
//! HTTP port): a bandwidth limit per download, a data connection cut after N bytes, a share of
//! logins refused with `530`, and a share of sessions turned away with `421` (a busy server).
//! Owned by [`FtpFaults`]; the FTP sessions read it, the admin API writes it.
//!
//! Every decision is deterministic and independent of arrival order, so the same scenario with
//! the same seed gets the same faults however its devices' sessions interleave: whether a
//! session is turned away or its login refused is [`decide`]`(seed, user, attempt, kind, share)`,
//! a pure function of the fault seed, the FTP user (the device id), and that user's attempt
//! number (its sessions started since the settings last changed, from 0). A cut happens after
//! exactly N bytes of a transfer, counted from where the transfer starts (so a client resuming
//! with `REST` always makes progress), and `dropTimes` counts each user's downloads on its own.
//!
//! The busy refusal is decided when `USER` arrives (the first moment the device is known) and the
//! session gets `421` and is closed, as a real server may answer `421` to any command. When the
//! server offers FTPS (the hub always does) the channel may be encrypted by `USER`, so the `421`
//! goes out at `PASS`, once libunftp says the channel is plain (`530` on an encrypted one); see
//! [`crate::ftp::auth`].
//!
//! Per-user state is two counters in a map keyed by a 64-bit hash of the user, cleared whenever
//! the settings change and capped at [`MAX_TRACKED_USERS`] entries (when full it is cleared and
//! attempt numbers start again from 0).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Parts per million: the unit of [`FaultSettings::refuse_login_ppm`].
const PPM: u64 = 1_000_000;
/// Largest single read through a faulty download.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Users whose attempts are counted at most (about 24 bytes each); past it the counts restart.
pub const MAX_TRACKED_USERS: usize = 1 << 20;

/// The fault settings in force. All off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultSettings {
    /// Largest download rate per transfer, in bytes per second (`None`: unlimited).
    pub bytes_per_second: Option<u64>,
    /// Cut the data connection after this many bytes of each download (`None`: never).
    pub drop_after_bytes: Option<u64>,
    /// How many downloads of each user to cut before the cut fault spares that user (`None`:
    /// every one).
    pub drop_times: Option<u64>,
    /// Share of logins refused with `530`, in parts per million (0 = none, 1,000,000 = all).
    pub refuse_login_ppm: u32,
    /// Share of sessions answered `421` and closed when `USER` arrives, in parts per million.
    pub busy_ppm: u32,
    /// Seed of the refusal decisions ([`decide`]): the same seed refuses the same attempts.
    pub seed: u64,
}

/// Why a fault settings document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FaultsError(pub String);

/// The fields of the admin API's JSON.
const FIELDS: [&str; 6] =
    ["bytesPerSecond", "dropAfterBytes", "dropTimes", "refuseLoginShare", "busyShare", "seed"];

impl FaultSettings {
    /// Reads the admin API's JSON: `{"bytesPerSecond": n|null, "dropAfterBytes": n|null,
    /// "dropTimes": n|null, "refuseLoginShare": 0.0..=1.0, "busyShare": 0.0..=1.0, "seed": n|null}`.
    /// Missing fields are off (`seed`: 0).
    pub fn from_json(v: &Value) -> Result<Self, FaultsError> {
        let obj = v.as_object().ok_or_else(|| FaultsError("the body must be a JSON object".into()))?;
        for key in obj.keys() {
            if !FIELDS.contains(&key.as_str()) {
                return Err(FaultsError(format!("unknown field '{key}'; allowed: {}", FIELDS.join(", "))));
            }
        }
        let count = |key: &str, min: u64| -> Result<Option<u64>, FaultsError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n >= min => Ok(Some(n)),
                    _ => Err(FaultsError(format!("'{key}' must be an integer >= {min} or null, got {v}"))),
                },
            }
        };
        let share = |key: &str| match obj.get(key) {
            None | Some(Value::Null) => Ok(0.0),
            Some(v) => match v.as_f64() {
                Some(s) if (0.0..=1.0).contains(&s) => Ok(s),
                _ => Err(FaultsError(format!("'{key}' must be a number in 0..=1, got {v}"))),
            },
        };
        Ok(Self {
            bytes_per_second: count("bytesPerSecond", 1)?,
            drop_after_bytes: count("dropAfterBytes", 0)?,
            drop_times: count("dropTimes", 1)?,
            refuse_login_ppm: (share("refuseLoginShare")? * PPM as f64).round() as u32,
            busy_ppm: (share("busyShare")? * PPM as f64).round() as u32,
            seed: count("seed", 0)?.unwrap_or(0),
        })
    }

    /// The admin API's JSON for these settings.
    pub fn to_json(&self) -> Value {
        json!({
            "bytesPerSecond": self.bytes_per_second,
            "dropAfterBytes": self.drop_after_bytes,
            "dropTimes": self.drop_times,
            "refuseLoginShare": f64::from(self.refuse_login_ppm) / PPM as f64,
            "busyShare": f64::from(self.busy_ppm) / PPM as f64,
            "seed": self.seed,
        })
    }
}

/// Which refusal a [`decide`] call is about; each kind draws independently of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `421` when `USER` arrives (`busyShare`).
    Busy,
    /// `530` at `PASS` (`refuseLoginShare`).
    RefuseLogin,
}

impl FaultKind {
    fn salt(self) -> u64 {
        match self {
            Self::Busy => 0x6275_7379_0000_0001,
            Self::RefuseLogin => 0x6c6f_6769_6e00_0002,
        }
    }
}

/// SplitMix64's finalizer: a bijective mix whose output bits each depend on every input bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of `user`: the key of its attempt counters.
pub fn user_key(user: &str) -> u64 {
    user.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Whether attempt `attempt` (from 0) of `user` meets the fault `kind` when `ppm` parts per
/// million of attempts should: a hash of (`seed`, `kind`, `user`, `attempt`) compared with the
/// share. Pure, so the answer does not depend on what other users do or in which order sessions
/// arrive; over many users or attempts the refused share approaches `ppm`.
pub fn decide(seed: u64, user: &str, attempt: u64, kind: FaultKind, ppm: u32) -> bool {
    let ppm = u64::from(ppm);
    if ppm == 0 {
        return false;
    }
    if ppm >= PPM {
        return true;
    }
    let h = mix(mix(mix(seed ^ kind.salt()) ^ user_key(user)) ^ attempt);
    h % PPM < ppm
}

/// One session's fault decisions, made when its user became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFaults {
    /// [`user_key`] of the session's user.
    pub user: u64,
    /// The user's attempt number (its sessions since the settings changed, from 0).
    pub attempt: u64,
    /// Turn the session away with `421`.
    pub busy: bool,
    /// Refuse its login with `530`.
    pub refuse_login: bool,
}

/// Per-user counts since the settings last changed.
#[derive(Debug, Default, Clone, Copy)]
struct UserCounts {
    sessions: u64,
    downloads: u64,
}

/// The live fault state shared by every FTP session and the admin API.
#[derive(Debug, Default)]
pub struct FtpFaults {
    settings: Mutex<FaultSettings>,
    /// Sessions and downloads per user (by [`user_key`]) since the settings last changed.
    users: Mutex<HashMap<u64, UserCounts>>,
}

impl FtpFaults {
    /// Faults all off.
    pub fn new() -> Self {
        Self::default()
    }

    /// The settings in force.
    pub fn settings(&self) -> FaultSettings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the settings and forgets every user's attempt and download counts.
    pub fn set(&self, settings: FaultSettings) {
        // Counts first, so no session counts against the new settings with an old number.
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        users.clear();
        users.shrink_to(0);
        drop(users);
        tracing::info!(faults = %settings.to_json(), "FTP fault settings changed");
    }

    /// Counts one more session of `user` (its `USER` command) and decides its faults.
    pub fn begin_session(&self, user: &str) -> SessionFaults {
        let key = user_key(user);
        let (s, attempt) = self.count(key, |c| &mut c.sessions);
        SessionFaults {
            user: key,
            attempt,
            busy: decide(s.seed, user, attempt, FaultKind::Busy, s.busy_ppm),
            refuse_login: decide(s.seed, user, attempt, FaultKind::RefuseLogin, s.refuse_login_ppm),
        }
    }

    /// Increments one of `key`'s counters; returns the settings in force and the count before.
    fn count(&self, key: u64, field: impl Fn(&mut UserCounts) -> &mut u64) -> (FaultSettings, u64) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let settings = self.settings();
        if users.len() >= MAX_TRACKED_USERS && !users.contains_key(&key) {
            tracing::warn!(max = MAX_TRACKED_USERS, "FTP fault attempt counts are full; starting again");
            users.clear();
        }
        let n = field(users.entry(key).or_default());
        let before = *n;
        *n += 1;
        (settings, before)
    }

    /// Wraps a download of the user with [`user_key`] `user` with the faults in force when it
    /// starts.
    pub fn wrap_download(
        &self,
        user: u64,
        inner: Box<dyn AsyncRead + Send + Sync + Unpin>,
    ) -> Box<dyn AsyncRead + Send + Sync + Unpin> {
        let s = self.settings();
        let cut_at = s.drop_after_bytes.filter(|_| match s.drop_times {
            None => true,
            Some(max) => self.count(user, |c| &mut c.downloads).1 < max,
        });
        if s.bytes_per_second.is_none() && cut_at.is_none() {
            return inner;
        }
        Box::new(FaultyReader {
            inner,
            rate: s.bytes_per_second,
            cut_at,
            read: 0,
            started: Instant::now(),
            pause: None,
            scratch: vec![0; SCRATCH_BYTES],
        })
    }

    /// Users with counts (for tests of the bound).
    pub fn tracked_users(&self) -> usize {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A download reader that enforces a rate and cuts the transfer after a byte count.
struct FaultyReader {
    inner: Box<dyn AsyncRead + Send + Sync + Unpin>,
    rate: Option<u64>,
    cut_at: Option<u64>,
    read: u64,
    started: Instant,
    pause: Option<Pin<Box<Sleep>>>,
    /// Where the inner reader writes before the bytes are copied out (bounded per read).
    scratch: Vec<u8>,
}

impl AsyncRead for FaultyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(pause) = this.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        if let Some(cut) = this.cut_at
            && this.read >= cut
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("fault injection: data connection dropped after {cut} bytes"),
            )));
        }
        if let Some(rate) = this.rate {
            // The time by which `read` bytes may have been sent at `rate`.
            let due = this.started + Duration::from_secs_f64(this.read as f64 / rate as f64);
            if due > Instant::now() {
                let mut sleep = Box::pin(tokio::time::sleep_until(due));
                if sleep.as_mut().poll(cx).is_pending() {
                    this.pause = Some(sleep);
                    return Poll::Pending;
                }
            }
        }
        // Read at most up to the cut and at most a tenth of a second's worth at the rate.
        let mut limit = buf.remaining() as u64;
        if let Some(cut) = this.cut_at {
            limit = limit.min(cut - this.read);
        }
        if let Some(rate) = this.rate {
            limit = limit.min((rate / 10).max(1));
        }
        let limit = (limit as usize).min(this.scratch.len());
        let mut sub = ReadBuf::new(&mut this.scratch[..limit]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut sub) {
            Poll::Ready(Ok(())) => {
                let n = sub.filled().len();
                buf.put_slice(sub.filled());
                this.read += n as u64;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn json_round_trip_and_validation() {
        let s = FaultSettings::from_json(
            &json!({"bytesPerSecond": 1000, "refuseLoginShare": 0.25, "busyShare": 0.5, "seed": 7}),
        )
        .unwrap();
        assert_eq!(s.busy_ppm, 500_000);
        assert_eq!(s.seed, 7);
        assert!(FaultSettings::from_json(&json!({"busyShare": -0.1})).is_err());
        assert_eq!(s.bytes_per_second, Some(1000));
        assert_eq!(s.refuse_login_ppm, 250_000);
        assert_eq!(s.drop_after_bytes, None);
        assert_eq!(FaultSettings::from_json(&s.to_json()).unwrap(), s);
        assert_eq!(FaultSettings::from_json(&json!({"seed": null})).unwrap().seed, 0);
        assert!(FaultSettings::from_json(&json!({"seed": -1})).is_err());
        assert!(FaultSettings::from_json(&json!({"refuseLoginShare": 1.5})).is_err());
        assert!(FaultSettings::from_json(&json!({"bytesPerSecond": 0})).is_err());
        let unknown = FaultSettings::from_json(&json!({"dropAfter": 5})).unwrap_err().0;
        assert!(unknown.contains("unknown field") && unknown.contains("seed"), "{unknown}");
        assert!(FaultSettings::from_json(&json!([1])).is_err());
    }

    #[test]
    fn decisions_are_a_pure_function_of_seed_user_attempt_and_kind() {
        let users: Vec<String> = (0..50).map(|i| format!("device-{i:03}")).collect();
        let run = |order: &mut dyn Iterator<Item = &String>| {
            let mut got = Vec::new();
            for u in order {
                for a in 0..8 {
                    got.push((u.clone(), a, decide(9, u, a, FaultKind::Busy, 300_000)));
                }
            }
            got.sort();
            got
        };
        assert_eq!(run(&mut users.iter()), run(&mut users.iter().rev()), "independent of order");
        assert_eq!(decide(1, "d", 3, FaultKind::Busy, 500_000), decide(1, "d", 3, FaultKind::Busy, 500_000));
        let differ = |f: &dyn Fn(u64) -> bool| (0..64).any(|a| f(a) != f(a + 1000));
        assert!(differ(&|a| decide(1, "d", a, FaultKind::Busy, 500_000)), "attempts draw anew");
        let seeds: Vec<bool> = (0..64).map(|s| decide(s, "d", 0, FaultKind::Busy, 500_000)).collect();
        assert!(seeds.contains(&true) && seeds.contains(&false), "the seed changes the draw");
        let kinds = (0..256)
            .filter(|&a| {
                decide(1, "d", a, FaultKind::Busy, 500_000)
                    != decide(1, "d", a, FaultKind::RefuseLogin, 500_000)
            })
            .count();
        assert!(kinds > 64, "busy and login draws are independent: {kinds} of 256 differ");
        assert!(!decide(1, "d", 0, FaultKind::Busy, 0));
        assert!((0..100).all(|a| decide(1, "d", a, FaultKind::RefuseLogin, 1_000_000)));
    }

    #[test]
    fn the_refused_share_matches_the_setting_over_many_users() {
        for ppm in [100_000u32, 300_000, 700_000] {
            let n = 20_000u64;
            let refused =
                (0..n).filter(|i| decide(42, &format!("sensor-{i}"), 0, FaultKind::Busy, ppm)).count();
            let observed = refused as f64 / n as f64;
            let want = f64::from(ppm) / 1e6;
            assert!((observed - want).abs() < 0.02, "share {want}: observed {observed}");
            // And over one user's attempts.
            let refused = (0..n).filter(|&a| decide(42, "one", a, FaultKind::RefuseLogin, ppm)).count();
            assert!((refused as f64 / n as f64 - want).abs() < 0.02);
        }
    }

    #[test]
    fn sessions_count_attempts_per_user_not_hub_wide() {
        let f = FtpFaults::new();
        f.set(FaultSettings {
            busy_ppm: 300_000,
            refuse_login_ppm: 300_000,
            seed: 5,
            ..FaultSettings::default()
        });
        // Two users' sessions interleaved one way, then the other: each user sees the same.
        let mut a = Vec::new();
        for _ in 0..10 {
            a.push(("x", f.begin_session("x")));
            a.push(("y", f.begin_session("y")));
        }
        f.set(FaultSettings {
            busy_ppm: 300_000,
            refuse_login_ppm: 300_000,
            seed: 5,
            ..FaultSettings::default()
        });
        let mut b: Vec<_> = (0..10).map(|_| ("y", f.begin_session("y"))).collect();
        b.extend((0..10).map(|_| ("x", f.begin_session("x"))));
        a.sort_by_key(|(u, s)| (*u, s.attempt));
        b.sort_by_key(|(u, s)| (*u, s.attempt));
        assert_eq!(a, b);
        assert_eq!(a[3].1.attempt, 3);
        assert_eq!(a[3].1.busy, decide(5, "x", 3, FaultKind::Busy, 300_000));
        assert_eq!(f.tracked_users(), 2);
        f.set(FaultSettings::default());
        assert_eq!(f.tracked_users(), 0, "new settings forget the counts");
        assert_eq!(
            f.begin_session("x"),
            SessionFaults { user: user_key("x"), attempt: 0, busy: false, refuse_login: false }
        );
    }

    #[tokio::test]
    async fn cut_after_n_bytes_then_spares_each_user_after_its_drop_times() {
        let f = FtpFaults::new();
        f.set(FaultSettings { drop_after_bytes: Some(10), drop_times: Some(1), ..FaultSettings::default() });
        let read = |user: &str| {
            let mut r = f.wrap_download(user_key(user), Box::new(std::io::Cursor::new(vec![7u8; 100])));
            async move {
                let mut got = Vec::new();
                let res = r.read_to_end(&mut got).await;
                (res.map_err(|e| e.kind()), got.len())
            }
        };
        assert_eq!(read("a").await, (Err(std::io::ErrorKind::ConnectionReset), 10));
        assert_eq!(read("a").await, (Ok(100), 100), "a's one cut is used up");
        assert_eq!(read("b").await, (Err(std::io::ErrorKind::ConnectionReset), 10), "b has its own");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_paces_the_transfer() {
        let f = FtpFaults::new();
        f.set(FaultSettings { bytes_per_second: Some(1000), ..FaultSettings::default() });
        let mut r = f.wrap_download(0, Box::new(std::io::Cursor::new(vec![1u8; 3000])));
        let start = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 3000);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2900) && took <= Duration::from_millis(3200), "{took:?}");
    }
}
