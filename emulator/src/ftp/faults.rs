//! The FTP server's fault knobs, switchable at runtime (`PUT /emulator/ftp/faults` on the plain
//! HTTP port): a bandwidth limit per download, a data connection cut after N bytes, a share of
//! logins refused, and a share of sessions turned away at connect with `421` (a busy server). Owned by [`FtpFaults`]; the FTP sessions read it, the admin API writes it.
//!
//! Everything is deterministic so tests can rely on it: refused logins and sessions are spread
//! evenly (a share of 0.5 refuses the 1st, 3rd, 5th … login), and a cut happens after exactly N bytes of a
//! transfer, counted from where the transfer starts (so a client resuming with `REST` always makes
//! progress).

use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Parts per million: the unit of [`FaultSettings::refuse_login_ppm`].
const PPM: u64 = 1_000_000;
/// Largest single read through a faulty download.
const SCRATCH_BYTES: usize = 16 * 1024;

/// The fault settings in force. All off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultSettings {
    /// Largest download rate per transfer, in bytes per second (`None`: unlimited).
    pub bytes_per_second: Option<u64>,
    /// Cut the data connection after this many bytes of each download (`None`: never).
    pub drop_after_bytes: Option<u64>,
    /// How many downloads to cut before the cut fault turns itself off (`None`: every one).
    pub drop_times: Option<u64>,
    /// Share of logins refused with `530`, in parts per million (0 = none, 1,000,000 = all).
    pub refuse_login_ppm: u32,
    /// Share of new sessions answered `421` and closed before the greeting, in parts per million.
    pub busy_ppm: u32,
}

/// Why a fault settings document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FaultsError(pub String);

impl FaultSettings {
    /// Reads the admin API's JSON: `{"bytesPerSecond": n|null, "dropAfterBytes": n|null,
    /// "dropTimes": n|null, "refuseLoginShare": 0.0..=1.0, "busyShare": 0.0..=1.0}`. Missing
    /// fields are off.
    pub fn from_json(v: &Value) -> Result<Self, FaultsError> {
        let obj = v.as_object().ok_or_else(|| FaultsError("the body must be a JSON object".into()))?;
        for key in obj.keys() {
            if !["bytesPerSecond", "dropAfterBytes", "dropTimes", "refuseLoginShare", "busyShare"]
                .contains(&key.as_str())
            {
                return Err(FaultsError(format!(
                    "unknown field '{key}'; allowed: bytesPerSecond, dropAfterBytes, dropTimes, refuseLoginShare, busyShare"
                )));
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
        })
    }
}

/// The live fault state shared by every FTP session and the admin API.
#[derive(Debug, Default)]
pub struct FtpFaults {
    settings: Mutex<FaultSettings>,
    /// Logins seen since the settings last changed (drives the even spread of refusals).
    logins: AtomicU64,
    /// Sessions seen since the settings last changed (drives the even spread of `421`s).
    sessions: AtomicU64,
    /// Downloads cut since the settings last changed (for `drop_times`).
    drops: AtomicU64,
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

    /// Replaces the settings and restarts the login and cut counters.
    pub fn set(&self, settings: FaultSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        self.logins.store(0, Ordering::SeqCst);
        self.sessions.store(0, Ordering::SeqCst);
        self.drops.store(0, Ordering::SeqCst);
        tracing::info!(faults = %settings.to_json(), "FTP fault settings changed");
    }

    /// Whether the next login is refused: the n-th login (from 0) is refused when
    /// `ceil((n+1)·share) > ceil(n·share)`, so refusals are spread evenly and the first login is
    /// refused whenever the share is above zero.
    pub fn refuse_next_login(&self) -> bool {
        spread(self.settings().refuse_login_ppm, &self.logins)
    }

    /// Whether the next session is turned away with `421`, spread like login refusals.
    pub fn refuse_next_session(&self) -> bool {
        spread(self.settings().busy_ppm, &self.sessions)
    }

    /// Wraps a download's reader with the faults in force when it starts.
    pub fn wrap_download(
        &self,
        inner: Box<dyn AsyncRead + Send + Sync + Unpin>,
    ) -> Box<dyn AsyncRead + Send + Sync + Unpin> {
        let s = self.settings();
        let cut_at = s.drop_after_bytes.filter(|_| match s.drop_times {
            None => true,
            Some(max) => self.drops.fetch_add(1, Ordering::SeqCst) < max,
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
}

/// Counts one more event on `seen` and says whether it is refused at `ppm`: the n-th (from 0) is
/// when `ceil((n+1)·share) > ceil(n·share)`.
fn spread(ppm: u32, seen: &AtomicU64) -> bool {
    let ppm = u64::from(ppm);
    if ppm == 0 {
        return false;
    }
    let n = seen.fetch_add(1, Ordering::SeqCst);
    ((n + 1) * ppm).div_ceil(PPM) > (n * ppm).div_ceil(PPM)
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
            &json!({"bytesPerSecond": 1000, "refuseLoginShare": 0.25, "busyShare": 0.5}),
        )
        .unwrap();
        assert_eq!(s.busy_ppm, 500_000);
        assert!(FaultSettings::from_json(&json!({"busyShare": -0.1})).is_err());
        assert_eq!(s.bytes_per_second, Some(1000));
        assert_eq!(s.refuse_login_ppm, 250_000);
        assert_eq!(s.drop_after_bytes, None);
        assert_eq!(FaultSettings::from_json(&s.to_json()).unwrap(), s);
        assert!(FaultSettings::from_json(&json!({"refuseLoginShare": 1.5})).is_err());
        assert!(FaultSettings::from_json(&json!({"bytesPerSecond": 0})).is_err());
        assert!(FaultSettings::from_json(&json!({"dropAfter": 5})).unwrap_err().0.contains("unknown field"));
        assert!(FaultSettings::from_json(&json!([1])).is_err());
    }

    #[test]
    fn refusals_are_spread_evenly_starting_with_the_first() {
        let f = FtpFaults::new();
        assert!(!f.refuse_next_login());
        f.set(FaultSettings { refuse_login_ppm: 500_000, ..FaultSettings::default() });
        let got: Vec<bool> = (0..6).map(|_| f.refuse_next_login()).collect();
        assert_eq!(got, [true, false, true, false, true, false]);
        f.set(FaultSettings { refuse_login_ppm: 1_000_000, ..FaultSettings::default() });
        assert!((0..10).all(|_| f.refuse_next_login()));
        f.set(FaultSettings { refuse_login_ppm: 300_000, ..FaultSettings::default() });
        assert_eq!((0..10).filter(|_| f.refuse_next_login()).count(), 3);
        assert!(!f.refuse_next_session(), "sessions have their own share");
        f.set(FaultSettings { busy_ppm: 500_000, ..FaultSettings::default() });
        let got: Vec<bool> = (0..4).map(|_| f.refuse_next_session()).collect();
        assert_eq!(got, [true, false, true, false]);
        assert!(!f.refuse_next_login());
    }

    #[tokio::test]
    async fn cut_after_n_bytes_then_turns_off_after_drop_times() {
        let f = FtpFaults::new();
        f.set(FaultSettings { drop_after_bytes: Some(10), drop_times: Some(1), ..FaultSettings::default() });
        let mut r = f.wrap_download(Box::new(std::io::Cursor::new(vec![7u8; 100])));
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(got.len(), 10);
        let mut r = f.wrap_download(Box::new(std::io::Cursor::new(vec![7u8; 100])));
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_paces_the_transfer() {
        let f = FtpFaults::new();
        f.set(FaultSettings { bytes_per_second: Some(1000), ..FaultSettings::default() });
        let mut r = f.wrap_download(Box::new(std::io::Cursor::new(vec![1u8; 3000])));
        let start = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 3000);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2900) && took <= Duration::from_millis(3200), "{took:?}");
    }
}
