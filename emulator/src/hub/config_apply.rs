//! The registry side of configurations (see `crate::configs`): re-evaluating a device against the
//! device configurations and its module twins against the module configurations, under the
//! device's shard lock, and the scans the metrics need. Owns no state; the configuration table
//! belongs to `crate::configs::Configs`, each device's record to its `DeviceExtra`, each module's
//! to its `Module`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::module::module_twin_parts;
use super::registry::twin_parts;
use super::{Device, Hub, SHARD_COUNT, Section, Twin};
use crate::clock::Millis;
use crate::configs::model::{self, ConfigKind, ConfigStatus, Configuration, TwinConfigs};
use crate::query::{Collection, Query};

/// A desired patch to send once the shard lock is released: to device `{deviceId}` or module
/// `{deviceId}/{moduleId}`.
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
        let by_kind = ByKind::new(configs);
        let now = self.now();
        let mut notices = Vec::new();
        let mut last = None;
        let mut done = 0;
        {
            let mut guard = self.shard(shard);
            let start = after.map_or(Unbounded, Excluded);
            for (id, d) in guard.devices.range_mut(start) {
                if done == budget {
                    return (notices, Some((shard, last)));
                }
                done += 1;
                last = Some(id.to_string());
                notices.append(&mut self.reconcile_kept(d, &by_kind, now));
            }
        }
        let next = (shard + 1 < SHARD_COUNT).then_some((shard + 1, None));
        (notices, next)
    }

    /// Re-evaluates devices `ids` (those that no longer exist are skipped).
    pub(crate) fn reconcile_devices(&self, ids: &[String], configs: &[Arc<Configuration>]) -> Vec<Notice> {
        let by_kind = ByKind::new(configs);
        let now = self.now();
        let mut notices = Vec::new();
        for id in ids {
            let sent = self.with_device(id, |d| Ok(self.reconcile_kept(d, &by_kind, now)));
            notices.extend(sent.unwrap_or_default());
        }
        notices
    }

    /// [`reconcile`], journaling what changed (`--persist`): the device twin, the device's record
    /// of statuses and written paths, and each changed module (identity, twin and its record).
    /// Called under the device's shard lock.
    fn reconcile_kept(&self, d: &mut Device, k: &ByKind<'_>, now: Millis) -> Vec<Notice> {
        let changed = reconcile(d, k, now);
        if changed.device_twin {
            self.record_twin(d);
        }
        if changed.device_record {
            self.record_device_configs(d);
        }
        for i in changed.modules {
            if let Some(m) = d.modules().get(i) {
                let id = m.id.clone();
                self.record_module(d, &id);
            }
        }
        changed.notices
    }

    /// (targeted, applied) twins of each configuration in `ids`, from the records of the devices
    /// and their modules, in one pass over the registry.
    pub(crate) fn config_status_counts(&self, ids: &[&str]) -> Vec<(usize, usize)> {
        let mut totals = vec![(0, 0); ids.len()];
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            let records: Vec<&TwinConfigs> = shard
                .devices
                .values()
                .filter_map(|d| d.extra.as_deref())
                .flat_map(|e| {
                    std::iter::once(&e.configurations).chain(e.modules.iter().map(|m| &m.configurations))
                })
                .filter(|r| !r.is_empty())
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

    /// How many twins `query`'s WHERE selects (`TOP` ignored), for custom metrics: device twins,
    /// or module twins for a query `FROM devices.modules`.
    pub(crate) fn count_matching(&self, query: &Query) -> usize {
        let roots = query.filter_roots();
        let mut n = 0;
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            n += match query.collection {
                Collection::Devices => {
                    shard.devices.values().filter(|d| query.matches(&twin_parts(d, 0, Some(&roots)))).count()
                }
                Collection::Modules => shard
                    .devices
                    .values()
                    .flat_map(|d| d.modules().iter().map(move |m| (d, m)))
                    .filter(|(d, m)| query.matches(&module_twin_parts(d, m, Some(&roots))))
                    .count(),
            };
        }
        n
    }
}

/// A snapshot's configurations split by kind, each with the top-level twin properties its
/// conditions read (so twins are built with just those).
struct ByKind<'a> {
    devices: Vec<&'a Configuration>,
    device_roots: Vec<&'a str>,
    modules: Vec<&'a Configuration>,
    module_roots: Vec<&'a str>,
}

impl<'a> ByKind<'a> {
    fn new(configs: &'a [Arc<Configuration>]) -> Self {
        let mut k = ByKind {
            devices: Vec::new(),
            device_roots: Vec::new(),
            modules: Vec::new(),
            module_roots: Vec::new(),
        };
        for c in configs {
            let (list, roots) = match c.kind {
                ConfigKind::Device => (&mut k.devices, &mut k.device_roots),
                ConfigKind::Module => (&mut k.modules, &mut k.module_roots),
            };
            list.push(&**c);
            for r in c.roots() {
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        k
    }
}

/// What [`reconcile`] changed.
#[derive(Default)]
struct Changed {
    /// Desired patches to notify (the device under its id, a module under
    /// `{deviceId}/{moduleId}`).
    notices: Vec<Notice>,
    /// The device twin's desired properties changed.
    device_twin: bool,
    /// The device's configuration record (statuses, written paths) changed.
    device_record: bool,
    /// Indices of the modules whose twin or configuration record changed.
    modules: Vec<usize>,
}

/// Brings `d` and its module twins in line with the configurations: device configurations for
/// the device twin, module configurations for each module twin.
fn reconcile(d: &mut Device, k: &ByKind<'_>, now: Millis) -> Changed {
    let mut changed = Changed::default();
    let empty = TwinConfigs::default();
    let old = d.extra.as_deref().map_or(&empty, |e| &e.configurations);
    let matching: Vec<&Configuration> = if k.devices.is_empty() {
        Vec::new()
    } else {
        let doc = twin_parts(d, 0, Some(&k.device_roots));
        k.devices.iter().copied().filter(|c| c.targets(&doc)).collect()
    };
    if !(matching.is_empty() && old.is_empty()) {
        let (patch, new) = reconcile_twin(&mut d.twin, old, &matching, now, &d.id);
        if new != *old {
            d.update_extra(|e| e.configurations = new);
            changed.device_record = true;
        }
        if let Some(p) = patch {
            changed.notices.push((d.id.clone(), p));
            changed.device_twin = true;
        }
    }
    // A device without modules stops here; one without module configurations only looks at
    // modules that still hold something from one.
    for i in 0..d.modules().len() {
        let m = &d.modules()[i];
        let matching: Vec<&Configuration> = if k.modules.is_empty() {
            Vec::new()
        } else {
            let doc = module_twin_parts(d, m, Some(&k.module_roots));
            k.modules.iter().copied().filter(|c| c.targets(&doc)).collect()
        };
        if matching.is_empty() && m.configurations.is_empty() {
            continue;
        }
        let who = format!("{}/{}", d.id, m.id);
        let Some(m) = d.extra.as_deref_mut().map(|e| &mut e.modules[i]) else { break };
        let (patch, new) = reconcile_twin(&mut m.twin, &m.configurations, &matching, now, &who);
        if patch.is_some() || new != m.configurations {
            changed.modules.push(i);
        }
        m.configurations = new;
        if let Some(p) = patch {
            changed.notices.push((who, p));
        }
    }
    changed
}

/// Brings one twin in line with the configurations of its kind that target it (`matching`):
/// what they write into its desired properties, what earlier configurations wrote (`old`) that
/// must go. Returns the desired patch to notify, when the desired properties changed, and the
/// twin's new record.
fn reconcile_twin(
    twin: &mut Twin,
    old: &TwinConfigs,
    matching: &[&Configuration],
    now: Millis,
    who: &str,
) -> (Option<Value>, TwinConfigs) {
    let resolution = model::resolve(matching);
    let (desired, mut paths) = model::apply(&twin.desired, &old.paths, &resolution.writes);
    let mut statuses = resolution.statuses;
    let mut notice = None;
    if desired != twin.desired {
        let before = twin.desired.clone();
        match twin.replace(Section::Desired, &Value::Object(desired), now) {
            Ok(_) => {
                let mut patch: Map<String, Value> = model::diff(&before, &twin.desired);
                patch.insert("$version".into(), Value::from(twin.desired_version));
                notice = Some(Value::Object(patch));
            }
            Err(e) => {
                tracing::warn!(twin = %who, "configurations could not be applied: {}", e.message);
                paths = old.paths.clone();
                for s in &mut statuses {
                    s.1 = ConfigStatus::Targeted;
                }
            }
        }
    }
    (notice, TwinConfigs { statuses, paths })
}
