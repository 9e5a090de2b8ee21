//! The readers of the built-in endpoint's partitions that Event Hubs' owner level (epoch) rules
//! need to know about (reference-2 §1.5): per consumer group and partition, which receivers are
//! attached and with which epoch. Owned by [`Hub`] behind its own mutex; the AMQP partition nodes
//! claim a slot at attach and release it at detach.
//!
//! Rules, as the Event Hubs service applies them: a receiver with an epoch at least the highest
//! present evicts every other receiver of the group and partition (each is told the new epoch and
//! detaches with `amqp:link:stolen`); one with a lower epoch is refused; one without an epoch is
//! refused while an epoch receiver is present; receivers without an epoch coexist, at most
//! [`MAX_READERS_PER_PARTITION`] per group and partition (Event Hubs' limit).
//!
//! An evicted receiver learns it through its claim's flag; the hub then wakes the event readers
//! (`events_notifier`), so its connection notices without a task or timer of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::Hub;

/// Readers without an epoch one consumer group may have on one partition (Event Hubs' limit; IoT
/// Hub's is not documented).
pub const MAX_READERS_PER_PARTITION: usize = 5;

/// No eviction yet (the flag's resting value).
const NOT_EVICTED: i64 = i64::MIN;

/// A receiver's place among its partition's readers; give it back with
/// [`Hub::release_receiver`].
#[derive(Debug)]
pub struct ReceiverClaim {
    id: u64,
    key: (String, usize),
    /// The claim's epoch, if it has one.
    pub epoch: Option<i64>,
    evicted_by: Arc<AtomicI64>,
}

impl ReceiverClaim {
    /// The epoch of the receiver that evicted this one, once one did.
    pub fn evicted_by(&self) -> Option<i64> {
        let e = self.evicted_by.load(Ordering::Acquire);
        (e != NOT_EVICTED).then_some(e)
    }
}

/// Why a receiver cannot attach (the link gets `amqp:link:stolen`, or `amqp:resource-limit-exceeded`
/// for [`ClaimRefused::TooManyReaders`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefused {
    /// A receiver with a higher epoch is attached.
    #[error(
        "Receiver 'nil' with a higher epoch '{current}' already exists. A receiver with epoch '{asked}' cannot be created. Make sure you are creating receiver with increasing epoch value to ensure connectivity, or ensure all old epoch receivers are closed or disconnected."
    )]
    LowerEpoch {
        /// The highest epoch attached.
        current: i64,
        /// The epoch asked for.
        asked: i64,
    },
    /// An epoch receiver is attached and this one has no epoch.
    #[error(
        "At least one receiver for the endpoint is created with epoch of '{current}', and so non-epoch receiver is not allowed. Either reconnect with a higher epoch, or make sure all epoch receivers are closed or disconnected."
    )]
    EpochPresent {
        /// The highest epoch attached.
        current: i64,
    },
    /// The group already has [`MAX_READERS_PER_PARTITION`] readers on the partition.
    #[error(
        "Exceeded the maximum number of allowed receivers per partition in a consumer group which is {MAX_READERS_PER_PARTITION}."
    )]
    TooManyReaders,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    epoch: Option<i64>,
    evicted_by: Arc<AtomicI64>,
}

/// Attached receivers by (lower-cased consumer group, partition index).
#[derive(Debug, Default)]
pub(super) struct Receivers {
    next_id: u64,
    slots: HashMap<(String, usize), Vec<Slot>>,
}

impl Receivers {
    fn claim(
        &mut self,
        group: &str,
        partition: usize,
        epoch: Option<i64>,
    ) -> Result<ReceiverClaim, ClaimRefused> {
        let key = (group.to_ascii_lowercase(), partition);
        let slots = self.slots.entry(key.clone()).or_default();
        let current = slots.iter().filter_map(|s| s.epoch).max();
        match (epoch, current) {
            (Some(asked), Some(current)) if asked < current => {
                return Err(ClaimRefused::LowerEpoch { current, asked });
            }
            (Some(asked), _) => {
                for s in slots.drain(..) {
                    s.evicted_by.store(asked, Ordering::Release);
                }
            }
            (None, Some(current)) => return Err(ClaimRefused::EpochPresent { current }),
            (None, None) if slots.len() >= MAX_READERS_PER_PARTITION => {
                return Err(ClaimRefused::TooManyReaders);
            }
            (None, None) => {}
        }
        self.next_id += 1;
        let evicted_by = Arc::new(AtomicI64::new(NOT_EVICTED));
        slots.push(Slot { id: self.next_id, epoch, evicted_by: evicted_by.clone() });
        Ok(ReceiverClaim { id: self.next_id, key, epoch, evicted_by })
    }

    fn release(&mut self, claim: &ReceiverClaim) {
        if let Some(slots) = self.slots.get_mut(&claim.key) {
            slots.retain(|s| s.id != claim.id);
            if slots.is_empty() {
                self.slots.remove(&claim.key);
            }
        }
    }
}

impl Hub {
    /// Claims a reader's place on `partition` of consumer group `group` with `epoch` (owner
    /// level), evicting the receivers a higher or equal epoch overrules (see the module docs).
    pub fn claim_receiver(
        &self,
        group: &str,
        partition: usize,
        epoch: Option<i64>,
    ) -> Result<ReceiverClaim, ClaimRefused> {
        let claim = self.receivers().claim(group, partition, epoch)?;
        if epoch.is_some() {
            // Evicted receivers on other connections notice on their next wake-up.
            self.events_notifier().notify_waiters();
        }
        Ok(claim)
    }

    /// Gives a receiver's place back (its link detached, or it was evicted).
    pub fn release_receiver(&self, claim: &ReceiverClaim) {
        self.receivers().release(claim);
    }

    fn receivers(&self) -> std::sync::MutexGuard<'_, Receivers> {
        self.shared.receivers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubConfig;

    #[test]
    fn epochs_evict_lower_ones_and_refuse_what_they_overrule() {
        let hub = Hub::new(HubConfig::default());
        let plain = hub.claim_receiver("$Default", 0, None).unwrap();
        let other_partition = hub.claim_receiver("$default", 1, None).unwrap();
        let e1 = hub.claim_receiver("$default", 0, Some(1)).unwrap();
        assert_eq!(plain.evicted_by(), Some(1), "an epoch receiver evicts the non-epoch one");
        assert_eq!(other_partition.evicted_by(), None, "other partitions are not touched");
        assert_eq!(
            hub.claim_receiver("$Default", 0, None).unwrap_err(),
            ClaimRefused::EpochPresent { current: 1 }
        );
        assert_eq!(
            hub.claim_receiver("$Default", 0, Some(0)).unwrap_err(),
            ClaimRefused::LowerEpoch { current: 1, asked: 0 }
        );
        let e1b = hub.claim_receiver("$Default", 0, Some(1)).unwrap();
        assert_eq!(e1.evicted_by(), Some(1), "an equal epoch evicts too");
        hub.release_receiver(&e1);
        hub.release_receiver(&e1b);
        let again = hub.claim_receiver("$Default", 0, None).unwrap();
        assert_eq!(again.evicted_by(), None, "with the epoch receivers gone, non-epoch ones attach");
        assert_eq!(hub.claim_receiver("cg2", 0, Some(7)).unwrap().evicted_by(), None, "groups are separate");
    }

    #[test]
    fn non_epoch_readers_are_capped_per_group_and_partition() {
        let hub = Hub::new(HubConfig::default());
        let claims: Vec<_> = (0..MAX_READERS_PER_PARTITION)
            .map(|_| hub.claim_receiver("$Default", 2, None).unwrap())
            .collect();
        assert_eq!(hub.claim_receiver("$Default", 2, None).unwrap_err(), ClaimRefused::TooManyReaders);
        hub.release_receiver(&claims[0]);
        hub.claim_receiver("$Default", 2, None).unwrap();
    }
}
