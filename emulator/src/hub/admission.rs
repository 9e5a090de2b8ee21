//! The hub's side of tier throttling: the one [`Throttle`] a hub with a tier owns (behind a
//! `std::sync::Mutex` locked for a few arithmetic steps, never across an `.await`) and the calls
//! front ends make before an operation. With no tier configured (the default) every call is an
//! `Option` check and nothing else: no lock, no clock read.
//!
//! A shaped request waits in hub time ([`Hub::sleep_until`]), so a time-travel jump wakes it. The
//! wait is bounded by construction: a shaped turn is at most `THROTTLE_BACKLOG_MS` away, anything
//! further is refused. No task or timer exists for a device that is not asking for something.

use serde_json::Value;

use super::Hub;
use crate::error::HubError;
use crate::throttle::{Admission, Op, Refusal, Tier};

impl Hub {
    /// The configured tier, if throttling is on.
    pub fn tier(&self) -> Option<Tier> {
        self.shared.config.throttle
    }

    /// Whether a tier is configured.
    pub fn throttling(&self) -> bool {
        self.shared.throttle.is_some()
    }

    fn with_throttle(&self, f: impl FnOnce(&mut crate::throttle::Throttle) -> Admission) -> Admission {
        match &self.shared.throttle {
            None => Admission::Now,
            Some(t) => f(&mut t.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Asks the throttle for `cost` units of `op` (operations; 4 KB chunks for direct methods).
    pub fn admit(&self, op: Op, cost: u32) -> Admission {
        if self.shared.throttle.is_none() {
            return Admission::Now;
        }
        let now = self.now();
        let a = self.with_throttle(|t| t.admit(op, cost, now));
        self.count_throttled(op, &a);
        a
    }

    /// Counts a shaped or refused admission in the metrics.
    fn count_throttled(&self, op: Op, a: &Admission) {
        match a {
            Admission::Now => {}
            Admission::Shaped { .. } => self.metrics().throttled(op, false),
            Admission::Refused(_) => self.metrics().throttled(op, true),
        }
    }

    /// Asks the throttle for a message send of `bytes`: the daily quota, then the rate of `op`.
    pub fn admit_message(&self, op: Op, bytes: usize) -> Admission {
        if self.shared.throttle.is_none() {
            return Admission::Now;
        }
        let now = self.now();
        let a = self.with_throttle(|t| t.admit_message(op, bytes, now));
        self.count_throttled(op, &a);
        a
    }

    /// The hub error for a refusal, in IoT Hub's words.
    pub fn throttle_error(&self, refusal: &Refusal) -> HubError {
        match self.tier() {
            Some(tier) => HubError::throttled(refusal, &tier),
            None => HubError::new(refusal.code, "throttled"),
        }
    }

    /// Waits out an admission: at once for `Now`, until its turn (hub time) for `Shaped`; a
    /// refusal becomes its hub error.
    pub async fn wait_for_turn(&self, admission: Admission) -> Result<(), HubError> {
        match admission {
            Admission::Now => Ok(()),
            Admission::Shaped { at_ms } => {
                self.sleep_until(at_ms).await;
                Ok(())
            }
            Admission::Refused(r) => Err(self.throttle_error(&r)),
        }
    }

    /// [`Hub::admit`], then waits for the request's turn; `Err` when refused.
    pub async fn admit_wait(&self, op: Op, cost: u32) -> Result<(), HubError> {
        match self.admit(op, cost) {
            Admission::Now => Ok(()),
            other => self.wait_for_turn(other).await,
        }
    }

    /// [`Hub::admit_message`], then waits for the message's turn; `Err` when refused.
    pub async fn admit_message_wait(&self, op: Op, bytes: usize) -> Result<(), HubError> {
        match self.admit_message(op, bytes) {
            Admission::Now => Ok(()),
            other => self.wait_for_turn(other).await,
        }
    }

    /// Paces the hub's own work (a job walking its devices) to the rate of `op`: waits for a turn
    /// however far away it is, never refused.
    pub async fn pace(&self, op: Op, cost: u32) {
        if self.shared.throttle.is_none() {
            return;
        }
        let now = self.now();
        if let Admission::Shaped { at_ms } = self.with_throttle(|t| t.reserve(op, cost, now)) {
            self.sleep_until(at_ms).await;
        }
    }

    /// The throttle's settings and counters (`GET /emulator/throttle`); `null` when off.
    pub fn throttle_stats(&self) -> Value {
        match &self.shared.throttle {
            None => Value::Null,
            Some(t) => {
                let now = self.now();
                t.lock().unwrap_or_else(|p| p.into_inner()).stats_json(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::error::ErrorCode;
    use crate::hub::HubConfig;
    use crate::throttle::Sku;

    const T0: u64 = 1_700_000_000_000;

    fn hub(tier: Option<Tier>) -> Hub {
        Hub::with_clock(HubConfig { throttle: tier, ..HubConfig::default() }, Arc::new(ManualClock::new(T0)))
    }

    #[test]
    fn off_by_default_admits_everything() {
        let hub = hub(None);
        assert!(!hub.throttling());
        for _ in 0..10_000 {
            assert_eq!(hub.admit(Op::Registry, 1), Admission::Now);
        }
        assert_eq!(hub.throttle_stats(), Value::Null);
    }

    #[tokio::test]
    async fn a_time_jump_wakes_shaped_requests_and_refills_the_bucket() {
        let hub = hub(Some(Tier::new(Sku::S1, 1).expect("tier")));
        let mut shaped = None;
        loop {
            match hub.admit(Op::C2dSend, 1) {
                Admission::Now => {}
                Admission::Shaped { at_ms } => shaped = Some(at_ms),
                Admission::Refused(r) => {
                    let e = hub.throttle_error(&r);
                    assert_eq!(e.code, ErrorCode::ThrottlingException);
                    assert!(e.retry_after_ms.is_some());
                    break;
                }
            }
        }
        // The manual clock never moves on its own: only the jump can wake this waiter.
        let at_ms = shaped.expect("some sends were shaped");
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_for_turn(Admission::Shaped { at_ms }).await }
        });
        tokio::task::yield_now().await;
        hub.advance_time(60_000).expect("advance");
        let woke =
            tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woke").expect("joined");
        assert!(woke.is_ok());
        assert_eq!(hub.admit(Op::C2dSend, 1), Admission::Now);
        assert_eq!(hub.throttle_stats()["operations"]["c2dSends"]["refused"], 1);
    }

    #[tokio::test]
    async fn paced_work_waits_for_its_turn_and_is_never_refused() {
        let hub = hub(Some(Tier::new(Sku::S1, 1).expect("tier")));
        // S1 jobs per-device operations: 10/s, so 1 s of burst passes 11 at once.
        for _ in 0..11 {
            tokio::time::timeout(Duration::from_secs(10), hub.pace(Op::JobsDeviceOp, 1))
                .await
                .expect("at once");
        }
        // The 12th waits 100 ms of hub time; the manual clock stands still, so only a jump frees it.
        let paced = tokio::spawn({
            let hub = hub.clone();
            async move { hub.pace(Op::JobsDeviceOp, 1).await }
        });
        tokio::task::yield_now().await;
        assert!(!paced.is_finished(), "paced work ran before its turn");
        hub.advance_time(100).expect("advance");
        tokio::time::timeout(Duration::from_secs(10), paced).await.expect("woke").expect("joined");
        // Past any backlog, paced work still only waits.
        for _ in 0..1000 {
            assert!(!matches!(
                hub.with_throttle(|t| t.reserve(Op::JobsDeviceOp, 1, T0)),
                Admission::Refused(_)
            ));
        }
    }
}
