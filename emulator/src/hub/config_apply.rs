//! The registry side of configurations (see `crate::configs`): re-evaluating devices against the
//! configurations under their shard lock, and the scans the metrics need. Owns no state; the
//! configuration table belongs to `crate::configs::Configs`, each device's record to its
//! `DeviceExtra`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::registry::twin_parts;
use super::{Device, Hub, SHARD_COUNT, Section};
use crate::clock::Millis;
use crate::configs::model::{self, ConfigStatus, Configuration, DeviceConfigs};
use crate::query::Query;

/// A desired patch to send to a device once its shard lock is released.
type Notice = (String, Value);

impl Hub {
    /// The configurations' owner.
    pub(crate) fn configs_state(&self) -> &crate::configs::Configs {
        &self.shared.configs
    }

    /// A fresh etag counter value (shared with identities: unique and increasing).
    pub(crate) fn next_etag(&self) -> u64 {
        self.next_counter()
    }

    /// Re-evaluates up to `budget` devices of shard `shard` after id `after`. Returns the
    /// desired patches to send and where to resume (`None`: the sweep is done).
    pub(crate) fn reconcile_chunk(
        &self,
        shard: usize,
        after: Option<&str>,
        budget: usize,
        configs: &[Arc<Configuration>],
    ) -> (Vec<Notice>, Option<(usize, Option<String>)>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let roots = roots(configs);
        let now = self.now();
        let mut notices = Vec::new();
        let mut last = None;
        let mut done = 0;
        {
            let mut guard = self.shard(shard);
            let start = after.map_or(Unbounded, |k| Excluded(k.to_string()));
            for (id, d) in guard.devices.range_mut((start, Unbounded)) {
                if done == budget {
                    return (notices, Some((shard, last)));
                }
                done += 1;
                last = Some(id.clone());
                if let Some(patch) = self.reconcile_kept(d, configs, &roots, now) {
                    notices.push((id.clone(), patch));
                }
            }
        }
        let next = (shard + 1 < SHARD_COUNT).then_some((shard + 1, None));
        (notices, next)
    }

    /// Re-evaluates devices `ids` (those that no longer exist are skipped).
    pub(crate) fn reconcile_devices(&self, ids: &[String], configs: &[Arc<Configuration>]) -> Vec<Notice> {
        let roots = roots(configs);
        let now = self.now();
        let mut notices = Vec::new();
        for id in ids {
            let patch =
                self.with_device(id, |d| Ok(self.reconcile_kept(d, configs, &roots, now))).ok().flatten();
            if let Some(p) = patch {
                notices.push((id.clone(), p));
            }
        }
        notices
    }

    /// [`reconcile`], journaling what changed (`--persist`): the twin, and the device's record of
    /// statuses and written paths. Called under the device's shard lock.
    fn reconcile_kept(
        &self,
        d: &mut Device,
        configs: &[Arc<Configuration>],
        roots: &[&str],
        now: Millis,
    ) -> Option<Value> {
        let (patch, records_changed) = reconcile(d, configs, roots, now);
        if patch.is_some() {
            self.record_twin(d);
        }
        if records_changed {
            self.record_device_configs(d);
        }
        patch
    }

    /// (targeted, applied) devices of each configuration in `ids`, from the devices' records, in
    /// one pass over the registry.
    pub(crate) fn config_status_counts(&self, ids: &[&str]) -> Vec<(usize, usize)> {
        let mut totals = vec![(0, 0); ids.len()];
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            let records: Vec<&DeviceConfigs> = shard
                .devices
                .values()
                .filter_map(|d| d.extra.as_deref())
                .map(|e| &e.configurations)
                .collect();
            if records.is_empty() {
                continue;
            }
            for (total, id) in totals.iter_mut().zip(ids) {
                let (t, a) = model::count_statuses(id, records.iter().copied());
                total.0 += t;
                total.1 += a;
            }
        }
        totals
    }

    /// How many twins `query`'s WHERE selects (`TOP` ignored), for custom metrics.
    pub(crate) fn count_matching(&self, query: &Query) -> usize {
        let roots = query.filter_roots();
        let mut n = 0;
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            n += shard.devices.values().filter(|d| query.matches(&twin_parts(d, 0, Some(&roots)))).count();
        }
        n
    }
}

/// The top-level twin properties any configuration's condition reads.
fn roots(configs: &[Arc<Configuration>]) -> Vec<&str> {
    let mut roots: Vec<&str> = Vec::new();
    for c in configs {
        for r in c.roots() {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
    }
    roots
}

/// Brings `d` in line with `configs`: which target it, what they write into its desired
/// properties, what earlier configurations wrote that must go. Returns the desired patch to
/// notify the device with, when its desired properties changed, and whether the device's record
/// (statuses, written paths) changed.
fn reconcile(
    d: &mut Device,
    configs: &[Arc<Configuration>],
    roots: &[&str],
    now: Millis,
) -> (Option<Value>, bool) {
    let empty = DeviceConfigs::default();
    let old = d.extra.as_deref().map_or(&empty, |e| &e.configurations);
    let matching: Vec<&Configuration> = if configs.is_empty() {
        Vec::new()
    } else {
        let doc = twin_parts(d, 0, Some(roots));
        configs.iter().filter(|c| c.targets(&doc)).map(|c| &**c).collect()
    };
    if matching.is_empty() && old.is_empty() {
        return (None, false);
    }
    let resolution = model::resolve(&matching);
    let (desired, mut paths) = model::apply(&d.twin.desired, &old.paths, &resolution.writes);
    let mut statuses = resolution.statuses;
    let mut notice = None;
    if desired != d.twin.desired {
        let before = d.twin.desired.clone();
        match d.twin.replace(Section::Desired, &Value::Object(desired), now) {
            Ok(_) => {
                let mut patch: Map<String, Value> = model::diff(&before, &d.twin.desired);
                patch.insert("$version".into(), Value::from(d.twin.desired_version));
                notice = Some(Value::Object(patch));
            }
            Err(e) => {
                tracing::warn!(device = %d.id, "configurations could not be applied: {}", e.message);
                paths = old.paths.clone();
                for s in &mut statuses {
                    s.1 = ConfigStatus::Targeted;
                }
            }
        }
    }
    let new = DeviceConfigs { statuses, paths };
    let changed = d.extra.as_deref().map_or(&empty, |e| &e.configurations) != &new;
    if changed {
        d.update_extra(|e| e.configurations = new);
    }
    (notice, changed)
}
