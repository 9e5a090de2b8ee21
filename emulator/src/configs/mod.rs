//! Configurations — IoT Hub's automatic device and module management (reference-2 §6): the REST
//! operations (`PUT/GET/DELETE /configurations/{id}`, list, `testQueries`) and the background
//! sweeper that writes each configuration's content into the desired properties of the twins its
//! target condition selects. A device configuration (`content.deviceContent`, a condition over
//! device twins) writes device twins; a module configuration (`content.moduleContent`, a
//! condition `FROM devices.modules WHERE …`) writes module twins. Priority is resolved per twin
//! among the configurations of its kind only, so the two never compete. IoT Edge deployments
//! (`modulesContent`) answer 501.
//!
//! Ownership: [`Configs`] lives in the hub's shared state and is the one owner of the
//! configuration table and of the pending re-evaluation work. Its one `std::sync::Mutex` is never
//! held together with a registry shard lock nor across an `.await`. What a twin received
//! (statuses and the paths written, [`model::TwinConfigs`]) lives with the twin: a device's in its
//! `DeviceExtra`, a module's in its `Module` (itself inside its device's `DeviceExtra`), so a
//! device nobody configures pays nothing, and a device without modules pays nothing for module
//! configurations.
//!
//! With `--persist` a configuration is journaled as written (its JSON, restored through
//! [`model::Configuration::restore`]) while the table lock is held, and each device's record with
//! the device (`hub::config_apply`); after recovery a full sweep is owed, which leaves twins that
//! were already in line untouched and finishes what the sweeper had not reached.
//!
//! When twins are evaluated (the design for a million devices): never inside the request that
//! changed something. A change only records work and wakes ONE sweeper task per hub:
//! - creating, retargeting (condition or priority) or deleting a configuration owes a **full
//!   sweep**: the sweeper walks the registry shard by shard, [`SWEEP_CHUNK`] devices per shard
//!   lock, yielding between chunks (a million devices × 100 configurations stays a background
//!   job that never blocks a shard for long);
//! - a twin write (tags, desired, reported), a device created or updated marks that device
//!   **dirty** (only while configurations exist: one atomic load otherwise); so does a write to
//!   one of its module twins or a module created or updated. The sweeper re-evaluates dirty
//!   devices [`SWEEP_CHUNK`] at a time: a device is re-evaluated together with its modules, all
//!   under one shard lock. At most [`DIRTY_MAX`] ids are kept; beyond that a full sweep is owed
//!   instead.
//!
//! The lag is the time the sweeper needs to reach the device: immediate for a dirty device on an
//! idle hub, up to one full sweep after a configuration change (IoT Hub itself documents minutes).
//! Metrics are computed when a configuration is read: system metrics from the twins' recorded
//! statuses (devices' and modules'), custom metrics by running their queries (over `devices` or
//! `devices.modules`, whichever they name).

pub mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::HubError;
use crate::hub::{Hub, IfMatch};
use model::{ConfigInput, ConfigTable, Configuration};

/// Devices evaluated per shard lock (and per dirty batch).
pub const SWEEP_CHUNK: usize = 512;
/// Most dirty device ids remembered; past it a full sweep is owed instead.
pub const DIRTY_MAX: usize = 100_000;

/// The hub's configurations and the work owed to twins.
#[derive(Debug, Default)]
pub struct Configs {
    state: Mutex<State>,
    /// Wakes the sweeper (shared with it: the sweeper holds no [`Hub`] while it waits).
    wake: Arc<tokio::sync::Notify>,
    /// Configurations in the table, read without the lock on every twin write.
    count: AtomicUsize,
    /// Whether the sweeper task was started.
    started: AtomicBool,
    /// Recovery (`--persist`) put back a twin's non-empty configuration record: a sweep is owed
    /// even with no configuration left (what a deleted one wrote may still need taking back).
    recovered_records: AtomicBool,
    /// Stops the sweeper when the hub shuts down, or when the hub is dropped (see `Drop`).
    shutdown: CancellationToken,
}

impl Drop for Configs {
    /// The last [`Hub`] handle is gone: the sweeper, which holds only a weak one, ends.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug, Default)]
struct State {
    table: ConfigTable,
    /// Devices to re-evaluate.
    dirty: BTreeSet<String>,
    /// A full sweep must (re)start from the first shard.
    full: bool,
    /// The full sweep in progress: shard and the last id done in it.
    cursor: Option<(usize, Option<String>)>,
}

/// One unit of sweeper work.
pub(crate) enum Work {
    /// Re-evaluate `SWEEP_CHUNK` devices of shard `.0` after id `.1`.
    Chunk(usize, Option<String>),
    /// Re-evaluate these devices.
    Devices(Vec<String>),
}

impl Configs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next unit of work and the configurations to evaluate against.
    pub(crate) fn take_work(&self) -> Option<(Work, Arc<[Arc<Configuration>]>)> {
        let mut s = self.lock();
        if std::mem::take(&mut s.full) {
            s.cursor = Some((0, None));
            s.dirty.clear();
        }
        let work = if let Some((shard, after)) = s.cursor.clone() {
            Work::Chunk(shard, after)
        } else if !s.dirty.is_empty() {
            let mut ids = Vec::with_capacity(SWEEP_CHUNK.min(s.dirty.len()));
            while ids.len() < SWEEP_CHUNK {
                let Some(id) = s.dirty.pop_first() else { break };
                ids.push(id);
            }
            Work::Devices(ids)
        } else {
            return None;
        };
        Some((work, s.table.snapshot()))
    }

    /// Records where the full sweep got to: `next` is the shard and id to resume after, or
    /// `None` when the sweep is done.
    pub(crate) fn advance(&self, next: Option<(usize, Option<String>)>) {
        let mut s = self.lock();
        if !s.full {
            s.cursor = next;
        }
    }

    fn owe_full_sweep(&self) {
        self.lock().full = true;
        self.wake.notify_one();
    }

    /// Whether there is nothing left to do (tests and the settle helper).
    fn idle(&self) -> bool {
        let s = self.lock();
        !s.full && s.cursor.is_none() && s.dirty.is_empty()
    }

    /// Puts back a configuration recovered from the state files (`--persist`).
    pub(crate) fn restore(&self, config: Configuration) {
        let mut s = self.lock();
        s.table.restore(config);
        self.count.store(s.table.len(), Ordering::Relaxed);
    }

    /// Removes a configuration recovery found deleted.
    pub(crate) fn restore_removed(&self, id: &str) {
        let mut s = self.lock();
        s.table.restore_removed(id);
        self.count.store(s.table.len(), Ordering::Relaxed);
    }

    /// Recovery put back a twin's non-empty configuration record.
    pub(crate) fn note_recovered_record(&self) {
        self.recovered_records.store(true, Ordering::Relaxed);
    }

    /// Configuration id `id`, shared with the table's when it holds that configuration.
    pub(crate) fn shared_id(&self, id: &str) -> Arc<str> {
        self.lock().table.shared_id(id).unwrap_or_else(|| Arc::from(id))
    }

    /// Every configuration (for a snapshot of the state).
    pub(crate) fn all(&self) -> Arc<[Arc<Configuration>]> {
        self.lock().table.snapshot()
    }
}

impl Hub {
    fn configs(&self) -> &Configs {
        self.configs_state()
    }

    /// Marks device `id` (with its modules) for re-evaluation after a change to its twin, its
    /// identity, one of its modules or module twins (cheap when the hub has no configurations).
    pub(crate) fn config_touch(&self, id: &str) {
        let c = self.configs();
        if c.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        // Configurations recovered by `--persist` have no sweeper yet.
        self.ensure_sweeper();
        {
            let mut s = c.lock();
            if s.dirty.len() >= DIRTY_MAX {
                s.full = true;
            } else {
                s.dirty.insert(id.to_string());
            }
        }
        c.wake.notify_one();
    }

    /// Starts the sweeper task once, if a Tokio runtime is there (without one, callers settle
    /// with [`Hub::settle_configurations`]).
    fn ensure_sweeper(&self) {
        let c = self.configs();
        if c.started.load(Ordering::Acquire) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if c.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let token = c.shutdown.clone();
        rt.spawn(sweeper(self.downgrade(), c.wake.clone(), token));
    }

    /// After recovery (`--persist`): the sweeper work the hub owed when it stopped is not kept,
    /// so a full sweep is owed when configurations exist or a twin holds what one wrote (twins
    /// already in line stay untouched), and the sweeper starts if a Tokio runtime is there.
    pub(crate) fn resume_configurations(&self) {
        let c = self.configs();
        {
            let mut s = c.lock();
            if s.table.is_empty() && !c.recovered_records.swap(false, Ordering::Relaxed) {
                return;
            }
            s.full = true;
        }
        self.ensure_sweeper();
        c.wake.notify_one();
    }

    /// Stops the sweeper (the hub is shutting down; dropping the last handle stops it too).
    pub fn shutdown_configurations(&self) {
        self.configs().shutdown.cancel();
    }

    /// Does all owed re-evaluation now, synchronously (tests; the sweeper does the same in the
    /// background).
    pub fn settle_configurations(&self) {
        while self.config_step() {}
    }

    /// Whether no re-evaluation is owed.
    pub fn configurations_settled(&self) -> bool {
        self.configs().idle()
    }

    /// One unit of sweeper work; false when there was none.
    fn config_step(&self) -> bool {
        let Some((work, snapshot)) = self.configs().take_work() else { return false };
        let notices = match work {
            Work::Chunk(shard, after) => {
                let (notices, next) = self.reconcile_chunk(shard, after.as_deref(), SWEEP_CHUNK, &snapshot);
                self.configs().advance(next);
                notices
            }
            Work::Devices(ids) => self.reconcile_devices(&ids, &snapshot),
        };
        for (id, patch) in notices {
            self.notify_desired(&id, patch);
        }
        true
    }

    /// `PUT /configurations/{id}`: creates (no `If-Match`) or updates. Returns the Configuration.
    pub fn put_configuration(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<IfMatch>,
    ) -> Result<Value, HubError> {
        let input = ConfigInput::parse(id, body)?;
        let now = self.now();
        let etag = self.next_etag();
        let c = self.configs();
        let (config, written) = {
            let mut s = c.lock();
            let r = s.table.put(id, input, if_match.as_ref(), now, etag)?;
            self.record_configuration(&r.0);
            c.count.store(s.table.len(), Ordering::Relaxed);
            if r.1.retarget {
                s.full = true;
            }
            r
        };
        if written.retarget {
            self.ensure_sweeper();
            c.wake.notify_one();
        }
        tracing::info!(configuration = id, created = written.created, "configuration written");
        Ok(self.configuration_json(&config))
    }

    /// `GET /configurations/{id}`, with metrics computed now.
    pub fn get_configuration(&self, id: &str) -> Result<Value, HubError> {
        let config = self.configs().lock().table.get(id)?;
        Ok(self.configuration_json(&config))
    }

    /// `GET /configurations?top=N`: every configuration (IoT Hub does not page them); the system
    /// metrics of all of them from one pass over the registry.
    pub fn list_configurations(&self, top: Option<usize>) -> Vec<Value> {
        let configs = self.configs().lock().table.list(top);
        let ids: Vec<&str> = configs.iter().map(|c| &*c.id).collect();
        let system = self.config_status_counts(&ids);
        configs.iter().zip(system).map(|(c, s)| c.to_json(s, &self.custom_metrics(c))).collect()
    }

    /// `DELETE /configurations/{id}`: the configuration's settings leave every twin it was
    /// applied to (by the next sweep).
    pub fn delete_configuration(&self, id: &str, if_match: Option<IfMatch>) -> Result<(), HubError> {
        let c = self.configs();
        {
            let mut s = c.lock();
            s.table.delete(id, if_match.as_ref())?;
            self.record_configuration_removed(id);
            c.count.store(s.table.len(), Ordering::Relaxed);
        }
        self.ensure_sweeper();
        c.owe_full_sweep();
        Ok(())
    }

    /// `POST /configurations/testQueries`.
    pub fn test_configuration_queries(&self, body: &Value) -> Result<Value, HubError> {
        model::test_queries(body)
    }

    fn configuration_json(&self, config: &Configuration) -> Value {
        let system = self.config_status_counts(&[&config.id])[0];
        config.to_json(system, &self.custom_metrics(config))
    }

    /// Runs `config`'s custom metric queries now.
    fn custom_metrics(&self, config: &Configuration) -> BTreeMap<String, usize> {
        config.metrics.iter().map(|(name, m)| (name.clone(), self.count_matching(&m.query))).collect()
    }
}

/// The sweeper: does owed work a unit at a time, yielding between units, and sleeps when none.
/// The sweeper task: does owed work, then waits for more. Holds the hub only for a step, so
/// dropping the last [`Hub`] ends it (the drop cancels `token`).
async fn sweeper(hub: crate::hub::WeakHub, wake: Arc<tokio::sync::Notify>, token: CancellationToken) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let worked = match hub.upgrade() {
            Some(hub) => hub.config_step(),
            None => return,
        };
        if worked {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = token.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod hub_tests;
