//! Durable state of what lives in a device's `DeviceExtra` beyond its identity — module identities
//! with their module twins, and the device's record of the configurations that target it — and
//! of the hub's configurations themselves: the records made from them, applied to them on
//! recovery, and written for them in snapshots (`--persist`; see the parent module).
//!
//! A module is one `Module` record (identity and twin together: modules are few, and a record
//! per change keeps replay a plain replace), named by its device's generation like every device
//! record, and by its own generation in `ModuleRemoved`. A configuration is its Configuration JSON
//! (restored through the service API's parser, so fields the parser learns later carry through)
//! plus the numbers the service cannot set. A device's configuration record (statuses and the
//! desired paths configurations wrote) is kept too, because it alone says what to take back from
//! a twin once a configuration stops applying; a sweep cannot rebuild it from the twin.

use std::sync::Arc;

use serde_json::Value;

use super::{Device, Hub, TwinText, auth_code, auth_of, put, twin_of};
use crate::configs::model::{ConfigStatus, Configuration, TwinConfigs};
use crate::hub::module::Module;
use crate::persist::codec::DecodeError;
use crate::persist::records::{ConfigurationRec, DeviceConfigsRec, ModuleRec, Record};

/// The `Module` record of module `m` of device `d`; `twin` is `m.twin`'s text.
fn module_record<'a>(d: &'a Device, m: &'a Module, twin: &'a TwinText) -> Record<'a> {
    let (pt, st) = match &m.thumbprints {
        Some((p, s)) => (p.as_deref(), s.as_deref()),
        None => (None, None),
    };
    Record::Module(ModuleRec {
        device_id: &d.id,
        device_generation: d.generation_id,
        id: &m.id,
        generation: m.generation_id,
        etag: m.etag,
        managed_by: m.managed_by.as_deref(),
        auth_type: auth_code(m.auth_type),
        primary_key: m.primary_key.as_deref(),
        secondary_key: m.secondary_key.as_deref(),
        has_thumbprints: m.thumbprints.is_some(),
        primary_thumbprint: pt,
        secondary_thumbprint: st,
        model_id: m.model_id.as_deref(),
        mqtt_session: m.session,
        twin: twin.rec(&m.twin),
    })
}

fn status_code(s: ConfigStatus) -> u8 {
    match s {
        ConfigStatus::Targeted => 0,
        ConfigStatus::Applied => 1,
    }
}

/// Frames the `DeviceConfigs` record of `c` (the record view borrows from it).
fn put_device_configs(out: &mut Vec<u8>, d: &Device, c: &TwinConfigs) -> u64 {
    put(out, &device_configs_record(d, c))
}

fn device_configs_record<'a>(d: &'a Device, c: &'a TwinConfigs) -> Record<'a> {
    configs_record(d, None, c)
}

/// The `DeviceConfigs` record of module `m`'s twin.
fn module_configs_record<'a>(d: &'a Device, m: &'a Module) -> Record<'a> {
    configs_record(d, Some(m), &m.configurations)
}

fn configs_record<'a>(d: &'a Device, m: Option<&'a Module>, c: &'a TwinConfigs) -> Record<'a> {
    Record::DeviceConfigs(DeviceConfigsRec {
        id: &d.id,
        generation: d.generation_id,
        module: m.map(|m| (&*m.id, m.generation_id)),
        statuses: c.statuses.iter().map(|(id, s)| (&**id, status_code(*s))).collect(),
        paths: c.paths.iter().map(|p| &**p).collect(),
    })
}

/// The Configuration JSON a `Configuration` record holds.
fn configuration_body(c: &Configuration) -> Vec<u8> {
    serde_json::to_vec(&c.stored_json()).expect("a JSON value serializes")
}

fn configuration_record<'a>(c: &'a Configuration, body: &'a [u8]) -> Record<'a> {
    Record::Configuration(ConfigurationRec {
        id: &c.id,
        seq: c.seq,
        etag: c.etag,
        created: c.created,
        updated: c.updated,
        body,
    })
}

/// Every configuration as framed records; returns how many.
pub(super) fn snapshot_configurations(configs: &[Arc<Configuration>], out: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for c in configs {
        let body = configuration_body(c);
        n += put(out, &configuration_record(c, &body));
    }
    n
}

/// `d`'s modules and configuration record as framed records; returns how many.
pub(super) fn snapshot_device_extra(d: &Device, out: &mut Vec<u8>) -> u64 {
    let Some(extra) = d.extra.as_deref() else { return 0 };
    let mut n = 0;
    for m in &extra.modules {
        let text = TwinText::of(&m.twin);
        n += put(out, &module_record(d, m, &text));
        if !m.configurations.is_empty() {
            n += put(out, &module_configs_record(d, m));
        }
    }
    if !extra.configurations.is_empty() {
        n += put_device_configs(out, d, &extra.configurations);
    }
    n
}

impl Hub {
    /// Appends module `module_id` of `d` (identity and twin) when journaling. Call it under
    /// `d`'s shard lock.
    pub(in crate::hub) fn record_module(&self, d: &Device, module_id: &str) {
        if self.journal().is_none() {
            return;
        }
        if let Some(m) = d.module(module_id) {
            let text = TwinText::of(&m.twin);
            self.record(&module_record(d, m, &text));
            // Modules are few: their configuration record goes with every module record.
            self.record(&module_configs_record(d, m));
        }
    }

    /// Appends that module `m` (being deleted) of `d` is gone.
    pub(in crate::hub) fn record_module_removed(&self, d: &Device, m: &Module) {
        self.record(&Record::ModuleRemoved {
            device_id: &d.id,
            device_generation: d.generation_id,
            id: &m.id,
            generation: m.generation_id,
        });
    }

    /// Appends `d`'s configuration record (statuses and written paths; empty when none).
    pub(in crate::hub) fn record_device_configs(&self, d: &Device) {
        if self.journal().is_none() {
            return;
        }
        let empty = TwinConfigs::default();
        let c = d.extra.as_deref().map_or(&empty, |e| &e.configurations);
        self.record(&device_configs_record(d, c));
    }

    /// Appends configuration `c` as written. Call it under the configuration table's lock.
    pub(crate) fn record_configuration(&self, c: &Configuration) {
        if self.journal().is_some() {
            let body = configuration_body(c);
            self.record(&configuration_record(c, &body));
        }
    }

    /// Appends that configuration `id` is gone. Call it under the configuration table's lock.
    pub(crate) fn record_configuration_removed(&self, id: &str) {
        self.record(&Record::ConfigurationRemoved { id });
    }

    /// Recovery: puts module `m` in its device (if that generation of the device exists), in
    /// place of the module of that id unless the present one is of a newer generation.
    pub(super) fn apply_module(&self, m: &ModuleRec<'_>, max_counter: &mut u64) -> Result<(), DecodeError> {
        *max_counter = (*max_counter).max(m.generation).max(m.etag);
        let thumbprints = m
            .has_thumbprints
            .then(|| (m.primary_thumbprint.map(str::to_owned), m.secondary_thumbprint.map(str::to_owned)));
        let module = Module {
            id: m.id.into(),
            generation_id: m.generation,
            etag: m.etag,
            managed_by: m.managed_by.map(Box::from),
            auth_type: auth_of(m.auth_type),
            primary_key: m.primary_key.map(str::to_owned),
            secondary_key: m.secondary_key.map(str::to_owned),
            thumbprints,
            model_id: m.model_id.map(Box::from),
            connected: false,
            connection_state_updated: 0,
            last_activity: 0,
            twin: twin_of(&m.twin)?,
            link: None,
            session: m.mqtt_session,
            // Its own record follows (`DeviceConfigs` naming the module).
            configurations: TwinConfigs::default(),
        };
        self.with_generation(m.device_id, m.device_generation, |d| {
            let at = d.modules().binary_search_by(|x| (*x.id).cmp(m.id));
            d.update_extra(|e| match at {
                Ok(i) if e.modules[i].generation_id > module.generation_id => {}
                Ok(i) => {
                    let mut module = module;
                    if e.modules[i].generation_id == module.generation_id {
                        module.configurations = std::mem::take(&mut e.modules[i].configurations);
                    }
                    e.modules[i] = module;
                }
                Err(i) => e.modules.insert(i, module),
            });
        });
        Ok(())
    }

    /// Recovery: removes module `id` of that generation from its device.
    pub(super) fn apply_module_removed(
        &self,
        device_id: &str,
        device_generation: u64,
        id: &str,
        generation: u64,
    ) {
        self.with_generation(device_id, device_generation, |d| {
            if d.module(id).is_some_and(|m| m.generation_id == generation) {
                d.update_extra(|e| e.modules.retain(|m| &*m.id != id));
            }
        });
    }

    /// Recovery: puts configuration `c` back in the table.
    pub(super) fn apply_configuration(
        &self,
        c: &ConfigurationRec<'_>,
        max_counter: &mut u64,
    ) -> Result<(), DecodeError> {
        let invalid = |detail: String| DecodeError::Invalid { what: "configuration", detail };
        let body: Value = serde_json::from_slice(c.body).map_err(|e| invalid(e.to_string()))?;
        let config = Configuration::restore(c.id, &body, c.seq, c.etag, c.created, c.updated)
            .map_err(|e| invalid(e.message))?;
        *max_counter = (*max_counter).max(c.etag);
        self.configs_state().restore(config);
        Ok(())
    }

    /// Recovery: sets the configuration record of the device's twin or of its module's twin
    /// (sharing the table's configuration ids).
    pub(super) fn apply_device_configs(&self, c: &DeviceConfigsRec<'_>) {
        let configs = self.configs_state();
        let statuses = c
            .statuses
            .iter()
            .map(|(id, s)| {
                let status = if *s == 1 { ConfigStatus::Applied } else { ConfigStatus::Targeted };
                (configs.shared_id(id), status)
            })
            .collect();
        let record = TwinConfigs { statuses, paths: c.paths.iter().map(|p| Box::from(*p)).collect() };
        if !record.is_empty() {
            configs.note_recovered_record();
        }
        self.with_generation(c.id, c.generation, |d| match c.module {
            None => d.update_extra(|e| e.configurations = record),
            Some((id, generation)) => {
                if let Some(m) = d.module_mut(id).filter(|m| m.generation_id == generation) {
                    m.configurations = record;
                }
            }
        });
    }
}
