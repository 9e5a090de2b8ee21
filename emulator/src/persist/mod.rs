//! Durable hub state (issue 15; design: `docs/designs/2026-12-durable-state.md`): the journal's
//! framing ([`codec`]) and the group-commit writer ([`journal`]). Records are state, not
//! operations, so replaying one twice changes nothing; the hub's records, snapshots and recovery
//! build on these two.

pub mod codec;
pub mod journal;
