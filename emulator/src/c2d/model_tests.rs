//! Model-based property test of [`DeviceQueue`]: random operation sequences run against the real
//! queue and against a deliberately naive reference model kept here, comparing every result,
//! every feedback outcome and the full queue state after each step.
//!
//! Times move in whole seconds so lock deadlines and expiries often land exactly on `now`,
//! which exercises the `deadline <= now` boundaries.

use std::collections::HashMap;

use proptest::prelude::*;

use super::queue::EntrySnapshot;
use super::*;

const T0: Millis = 1_700_000_000_000;
const SEC: u64 = 1000;
const HOUR: u64 = 3600 * SEC;

/// How a generated send chooses its expiry.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    Default,
    /// Seconds from now, possibly in the past.
    Offset(i64),
    /// `now + max_ttl + extra_ms`: 0 is the last accepted instant.
    TooFar(u64),
}

#[derive(Debug, Clone, Copy)]
enum Body {
    Small(usize),
    /// `max - size_of_id + extra`: 0 is the largest accepted body.
    AtLimit(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Complete,
    Abandon,
    Reject,
    Release,
}

#[derive(Debug, Clone)]
enum Op {
    Send(AckMode, Expiry, Body),
    /// Send until the queue refuses.
    Fill(AckMode),
    /// Lock duration in seconds.
    Receive(u64),
    /// Settle with the n-th token handed out (modulo), or an unknown token when none exists.
    Settle(Act, usize),
    Purge,
    Pending,
    Advance(u64),
}

fn ack() -> impl Strategy<Value = AckMode> {
    prop_oneof![Just(AckMode::None), Just(AckMode::Positive), Just(AckMode::Negative), Just(AckMode::Full)]
}

fn op() -> impl Strategy<Value = Op> {
    let expiry = prop_oneof![
        3 => Just(Expiry::Default),
        3 => (-60i64..180).prop_map(Expiry::Offset),
        1 => (0u64..2).prop_map(Expiry::TooFar),
    ];
    let body =
        prop_oneof![20 => (0usize..16).prop_map(Body::Small), 1 => (0usize..2).prop_map(Body::AtLimit)];
    let act = prop_oneof![Just(Act::Complete), Just(Act::Abandon), Just(Act::Reject), Just(Act::Release)];
    prop_oneof![
        8 => (ack(), expiry, body).prop_map(|(a, e, b)| Op::Send(a, e, b)),
        1 => ack().prop_map(Op::Fill),
        7 => (0u64..120).prop_map(Op::Receive),
        8 => (act, any::<usize>()).prop_map(|(a, i)| Op::Settle(a, i)),
        1 => Just(Op::Purge),
        1 => Just(Op::Pending),
        5 => (0u64..180).prop_map(|s| Op::Advance(s * SEC)),
        1 => (1u64..50).prop_map(|h| Op::Advance(h * HOUR)),
    ]
}

/// The model's view of one non-final message.
#[derive(Debug, Clone)]
struct MMsg {
    seq: u64,
    id: String,
    ack: AckMode,
    enqueued_at: Millis,
    expires_at: Millis,
    count: u32,
    lock: Option<(LockToken, Millis)>,
}

/// The reference model: a plain list plus the record of every final state reached.
#[derive(Debug, Default)]
struct Model {
    msgs: Vec<MMsg>,
    last_seq: u64,
    /// Final status of every message that left the queue, by message id.
    finals: HashMap<String, FeedbackStatus>,
    /// Acks by message id, for the end-of-run check.
    acks: HashMap<String, AckMode>,
}

/// Written out in full rather than calling `AckMode::wants`, so the model checks it.
fn model_wants(ack: AckMode, status: FeedbackStatus) -> bool {
    use FeedbackStatus as S;
    match ack {
        AckMode::None => false,
        AckMode::Positive => matches!(status, S::Success),
        AckMode::Negative => {
            matches!(status, S::Expired | S::DeliveryCountExceeded | S::Rejected | S::Purged)
        }
        AckMode::Full => true,
    }
}

impl Model {
    fn finish(&mut self, m: MMsg, status: FeedbackStatus, at: Millis, out: &mut Vec<Outcome>) {
        assert!(self.finals.insert(m.id.clone(), status).is_none(), "{} finalised twice", m.id);
        if model_wants(m.ack, status) {
            out.push(Outcome { message_id: Some(m.id), enqueued_at: at, status });
        }
    }

    fn sweep(&mut self, now: Millis, out: &mut Vec<Outcome>) {
        for mut m in std::mem::take(&mut self.msgs) {
            if m.expires_at <= now {
                let at = m.expires_at;
                self.finish(m, FeedbackStatus::Expired, at, out);
                continue;
            }
            if matches!(m.lock, Some((_, until)) if until <= now) {
                m.lock = None;
            }
            self.msgs.push(m);
        }
    }

    fn send(&mut self, msg: &C2dMessage, now: Millis, cfg: &QueueConfig) -> Result<SendReceipt, SendError> {
        let size = msg.body.len() + msg.message_id.as_ref().map_or(0, String::len);
        if size > cfg.max_message_bytes {
            return Err(SendError::TooLarge { size, max: cfg.max_message_bytes });
        }
        let latest = now + cfg.max_ttl_ms;
        let expires_at = msg.expiry.unwrap_or(now + cfg.default_ttl_ms);
        if expires_at > latest {
            return Err(SendError::InvalidExpiry { expiry: expires_at, latest });
        }
        if self.msgs.len() == cfg.max_depth {
            return Err(SendError::QueueFull { depth: cfg.max_depth });
        }
        self.last_seq += 1;
        let id = msg.message_id.clone().unwrap_or_default();
        self.acks.insert(id.clone(), msg.ack);
        let (seq, ack, count, lock) = (self.last_seq, msg.ack, 0, None);
        self.msgs.push(MMsg { seq, id, ack, enqueued_at: now, expires_at, count, lock });
        Ok(SendReceipt { sequence_number: seq, expires_at })
    }

    fn receive(&mut self, now: Millis, lock_ms: u64, token: LockToken) -> Option<(u64, u32, Millis, Millis)> {
        let m = self.msgs.iter_mut().filter(|m| m.lock.is_none()).min_by_key(|m| m.seq)?;
        m.lock = Some((token, now + lock_ms));
        Some((m.seq, m.count, m.enqueued_at, m.expires_at))
    }

    fn settle(
        &mut self,
        act: Act,
        token: LockToken,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut Vec<Outcome>,
    ) -> bool {
        let Some(i) = self.msgs.iter().position(|m| matches!(m.lock, Some((t, _)) if t == token)) else {
            return false;
        };
        self.msgs[i].lock = None;
        let status = match act {
            Act::Release => return true,
            Act::Complete => FeedbackStatus::Success,
            Act::Reject => FeedbackStatus::Rejected,
            Act::Abandon => {
                self.msgs[i].count += 1;
                if self.msgs[i].count < cfg.max_delivery_count {
                    return true;
                }
                FeedbackStatus::DeliveryCountExceeded
            }
        };
        let m = self.msgs.remove(i);
        self.finish(m, status, now, out);
        true
    }

    fn snapshot(&self) -> Vec<EntrySnapshot> {
        self.msgs.iter().map(|m| (m.seq, m.count, m.lock, m.expires_at)).collect()
    }
}

/// The system under test, the model and the run's bookkeeping.
struct Run {
    cfg: QueueConfig,
    queue: DeviceQueue,
    model: Model,
    now: Millis,
    sends: u64,
    tokens: Vec<LockToken>,
    /// Every outcome the real queue produced.
    seen: Vec<Outcome>,
}

impl Run {
    fn new(cfg: QueueConfig) -> Self {
        let (queue, model) = (DeviceQueue::new(), Model::default());
        Self { cfg, queue, model, now: T0, sends: 0, tokens: Vec::new(), seen: Vec::new() }
    }

    fn message(&mut self, ack: AckMode, expiry: Expiry, body: Body) -> C2dMessage {
        self.sends += 1;
        let id = format!("m{}", self.sends);
        let len = match body {
            Body::Small(n) => n,
            Body::AtLimit(extra) => self.cfg.max_message_bytes - id.len() + extra,
        };
        let expiry = match expiry {
            Expiry::Default => None,
            Expiry::Offset(s) => Some(self.now.saturating_add_signed(s * 1000)),
            Expiry::TooFar(extra) => Some(self.now + self.cfg.max_ttl_ms + extra),
        };
        C2dMessage { message_id: Some(id), ack, expiry, body: vec![7u8; len].into(), ..Default::default() }
    }

    fn send(&mut self, msg: C2dMessage) -> Result<SendReceipt, SendError> {
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.model.sweep(self.now, &mut want);
        let expected = self.model.send(&msg, self.now, &self.cfg);
        let actual = self.queue.send(msg, self.now, &self.cfg, &mut got);
        assert_eq!(actual, expected);
        self.outcomes(got, want);
        actual
    }

    fn receive(&mut self, lock_ms: u64) {
        let token = LockToken(0xC2D0_0000_0000 + self.tokens.len() as u128);
        self.tokens.push(token);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.model.sweep(self.now, &mut want);
        let expected = self.model.receive(self.now, lock_ms, token);
        let actual = self.queue.receive(self.now, lock_ms, token, &self.cfg, &mut got);
        if let Some(d) = &actual {
            assert!(d.expires_at > self.now, "delivered after expiry");
            assert_eq!(d.lock_token, token);
            assert_eq!(d.locked_until, self.now + lock_ms);
            assert_eq!(
                d.message.message_id.as_ref(),
                self.model.msgs.iter().find(|m| m.seq == d.sequence_number).map(|m| &m.id)
            );
        }
        let actual = actual.map(|d| (d.sequence_number, d.delivery_count, d.enqueued_at, d.expires_at));
        assert_eq!(actual, expected);
        self.outcomes(got, want);
    }

    fn settle(&mut self, act: Act, pick: usize) {
        let token = match self.tokens.len() {
            0 => LockToken(u128::MAX),
            n => self.tokens[pick % n],
        };
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.model.sweep(self.now, &mut want);
        let ok = self.model.settle(act, token, self.now, &self.cfg, &mut want);
        let (now, cfg, q) = (self.now, &self.cfg, &mut self.queue);
        let actual = match act {
            Act::Complete => q.complete(token, now, cfg, &mut got),
            Act::Abandon => q.abandon(token, now, cfg, &mut got),
            Act::Reject => q.reject(token, now, cfg, &mut got),
            Act::Release => q.release(token, now, cfg, &mut got),
        };
        let expected = if ok { Ok(()) } else { Err(SettleError::LockLost { token }) };
        assert_eq!(actual, expected);
        self.outcomes(got, want);
    }

    fn purge(&mut self) {
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.model.sweep(self.now, &mut want);
        let expected = self.model.msgs.len();
        for m in std::mem::take(&mut self.model.msgs) {
            self.model.finish(m, FeedbackStatus::Purged, self.now, &mut want);
        }
        assert_eq!(self.queue.purge(self.now, &self.cfg, &mut got), expected);
        self.outcomes(got, want);
    }

    fn pending(&mut self) {
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.model.sweep(self.now, &mut want);
        assert_eq!(self.queue.pending(self.now, &self.cfg, &mut got), self.model.msgs.len());
        self.outcomes(got, want);
    }

    fn outcomes(&mut self, got: Vec<Outcome>, want: Vec<Outcome>) {
        assert_eq!(got, want);
        self.seen.extend(got);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send(ack, expiry, body) => {
                let msg = self.message(ack, expiry, body);
                let _ = self.send(msg);
            }
            Op::Fill(ack) => self.fill(ack),
            Op::Receive(secs) => self.receive(secs * SEC),
            Op::Settle(act, pick) => self.settle(act, pick),
            Op::Purge => self.purge(),
            Op::Pending => self.pending(),
            Op::Advance(ms) => self.now += ms,
        }
        assert!(self.queue.snapshot().len() <= self.cfg.max_depth);
        assert_eq!(self.queue.snapshot(), self.model.snapshot());
    }

    /// Sends until refused; the refusal must be `QueueFull` at exactly the maximum depth.
    fn fill(&mut self, ack: AckMode) {
        for _ in 0..=self.cfg.max_depth {
            let msg = self.message(ack, Expiry::Default, Body::Small(1));
            if let Err(e) = self.send(msg) {
                assert_eq!(e, SendError::QueueFull { depth: self.cfg.max_depth });
                return;
            }
        }
        panic!("queue accepted more than {} messages", self.cfg.max_depth);
    }

    /// Lets everything expire, then checks that every message that ended produced feedback
    /// exactly once iff its ack mode asked for it, with its final status.
    fn finish(mut self) {
        self.now += self.cfg.max_ttl_ms + 1;
        self.pending();
        assert!(self.queue.is_empty());
        let mut seen: HashMap<String, Vec<FeedbackStatus>> = HashMap::new();
        for o in &self.seen {
            seen.entry(o.message_id.clone().unwrap_or_default()).or_default().push(o.status);
        }
        assert_eq!(self.model.finals.len(), self.model.acks.len(), "every accepted message ended");
        for (id, status) in &self.model.finals {
            let want = if model_wants(self.model.acks[id], *status) { vec![*status] } else { vec![] };
            assert_eq!(seen.remove(id).unwrap_or_default(), want, "feedback for {id}");
        }
        assert!(seen.is_empty(), "feedback for unknown messages: {seen:?}");
    }
}

fn config() -> impl Strategy<Value = QueueConfig> {
    prop_oneof![Just(1u32), Just(2), Just(3), Just(10)]
        .prop_map(|max_delivery_count| QueueConfig { max_delivery_count, ..QueueConfig::default() })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn queue_matches_model(cfg in config(), ops in prop::collection::vec(op(), 1..60)) {
        let mut run = Run::new(cfg);
        for op in &ops {
            run.apply(op);
        }
        run.finish();
    }
}
