//! Durable hub state (issue 15; design: `docs/designs/2026-12-durable-state.md`): the journal's
//! framing ([`codec`]), the group-commit writer ([`journal`]), the hub's state records
//! ([`records`]) and the state directory's files, recovery reader and snapshot writer
//! ([`store`]). Records are state, not operations, so replaying one twice changes nothing; the
//! hub writes and applies them in `hub::durable`.

pub mod codec;
pub mod journal;
pub mod records;
pub mod store;

pub use journal::SyncMode;
pub use store::PersistError;

/// Where and how the hub keeps its state (`--persist`, `--persist-sync`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistConfig {
    /// The state directory (`<data-dir>/state`).
    pub dir: std::path::PathBuf,
    /// `Write` (answered once written: survives kill -9) or `Sync` (`fdatasync` per group commit:
    /// survives a power cut).
    pub sync: SyncMode,
}
