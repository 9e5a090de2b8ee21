//! [`DeviceMap`]: the devices of one registry shard, in device-id order (what query paging and the
//! dashboard walk), found by id without reading the other ids' bytes.
//!
//! A `BTreeMap<String, _>` compares a looked-up id with the ids of every node on its path, and each
//! of those is a heap allocation of its own: about a dozen cache misses a look-up on a large
//! registry, three look-ups for every C2D message. Here each key also carries its first 16 bytes
//! inline ([`Key::head`], big-endian, zero-padded), which orders keys exactly as their ids do
//! (where two heads are equal, ids of up to 16 bytes are ordered by their length, longer ones by
//! their bytes), so a look-up reads no id bytes for ids of up to 16 bytes, and for longer ones only
//! those of the keys that share its first 16.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

use super::Device;

/// The first 16 bytes of `id`, zero-padded, as a big-endian number: comparing two heads orders
/// two ids as comparing the ids does, unless the heads are equal.
fn head_of(id: &str) -> u128 {
    let mut b = [0u8; 16];
    let n = id.len().min(16);
    b[..n].copy_from_slice(&id.as_bytes()[..n]);
    u128::from_be_bytes(b)
}

/// A device id with its head inline.
#[derive(Debug, Clone)]
struct Key {
    head: u128,
    id: Box<str>,
}

/// What a key and a looked-up id have in common, so the map can compare them (the map borrows a
/// [`Key`] as this trait object, and a look-up passes a [`Probe`] as one).
trait Ordered {
    fn head(&self) -> u128;
    fn id(&self) -> &str;
}

impl Ordered for Key {
    fn head(&self) -> u128 {
        self.head
    }
    fn id(&self) -> &str {
        &self.id
    }
}

/// A looked-up id, borrowed.
struct Probe<'a> {
    head: u128,
    id: &'a str,
}

impl<'a> Probe<'a> {
    fn new(id: &'a str) -> Self {
        Self { head: head_of(id), id }
    }
}

impl Ordered for Probe<'_> {
    fn head(&self) -> u128 {
        self.head
    }
    fn id(&self) -> &str {
        self.id
    }
}

impl PartialEq for dyn Ordered + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for dyn Ordered + '_ {}

impl PartialOrd for dyn Ordered + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn Ordered + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        order(self.head(), self.id(), other.head(), other.id())
    }
}

/// The order of ids `a` and `b` with heads `ha` and `hb`: the heads first; where they are equal and
/// both ids fit in them, the shorter id is a prefix of the other (the rest of its head is zeros),
/// so the lengths decide without reading either id's bytes; only longer ids are compared.
fn order(ha: u128, a: &str, hb: u128, b: &str) -> Ordering {
    ha.cmp(&hb).then_with(|| if a.len() <= 16 && b.len() <= 16 { a.len().cmp(&b.len()) } else { a.cmp(b) })
}

impl<'a> Borrow<dyn Ordered + 'a> for Key {
    fn borrow(&self) -> &(dyn Ordered + 'a) {
        self
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        order(self.head, &self.id, other.head, &other.id)
    }
}

/// A range bound on a probe, as the trait object the map compares with.
fn as_ordered<'p>(bound: &'p Bound<Probe<'p>>) -> Bound<&'p dyn Ordered> {
    match bound {
        Bound::Included(p) => Bound::Included(p as &dyn Ordered),
        Bound::Excluded(p) => Bound::Excluded(p as &dyn Ordered),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The devices of one shard by id, in id order.
#[derive(Debug, Default)]
pub(super) struct DeviceMap {
    map: BTreeMap<Key, Device>,
}

impl DeviceMap {
    /// The device `id`.
    pub(super) fn get(&self, id: &str) -> Option<&Device> {
        self.map.get(&Probe::new(id) as &dyn Ordered)
    }

    /// The device `id`, to change.
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Device> {
        self.map.get_mut(&Probe::new(id) as &dyn Ordered)
    }

    /// Adds (or replaces) the device `id`; returns the one replaced.
    pub(super) fn insert(&mut self, id: String, device: Device) -> Option<Device> {
        self.map.insert(Key { head: head_of(&id), id: id.into_boxed_str() }, device)
    }

    /// Removes the device `id`.
    pub(super) fn remove(&mut self, id: &str) -> Option<Device> {
        self.map.remove(&Probe::new(id) as &dyn Ordered)
    }

    /// How many devices.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Every device, in id order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Device> {
        self.map.values()
    }

    /// Every device, in id order, to change.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Device> {
        self.map.values_mut()
    }

    /// The devices from `start` on, in id order, with their ids.
    pub(super) fn range<'s>(&'s self, start: Bound<&str>) -> impl Iterator<Item = (&'s str, &'s Device)> {
        let probe = start.map(Probe::new);
        self.map.range::<dyn Ordered, _>((as_ordered(&probe), Bound::Unbounded)).map(|(k, d)| (&*k.id, d))
    }

    /// The devices from `start` on, in id order, with their ids, to change.
    pub(super) fn range_mut<'s>(
        &'s mut self,
        start: Bound<&str>,
    ) -> impl Iterator<Item = (&'s str, &'s mut Device)> {
        let probe = start.map(Probe::new);
        self.map.range_mut::<dyn Ordered, _>((as_ordered(&probe), Bound::Unbounded)).map(|(k, d)| (&*k.id, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<String> {
        let mut v: Vec<String> = [
            "a",
            "a-",
            "ab",
            "fanout-000001",
            "fanout-000010",
            "fanout-0000100",
            "fridge-000000000001",
            "fridge-000000000001-x",
            "fridge-000000000002",
            "fridge-00000000000",
            "zz",
            "Z",
            "0123456789abcdef",
            "0123456789abcdefg",
            "0123456789abcdee~",
            "%$@!",
            "nul",
            "nul\u{0}",
            "nul\u{0}\u{0}x",
            "0123456789abcde",
            "0123456789abcde\u{0}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for i in 0..300 {
            v.push(format!("device-{:05}-{}", (i * 7919) % 1000, "x".repeat(i % 5)));
        }
        v
    }

    /// The ids `m` walks from `start` are those `model` walks from it.
    fn assert_same_from(m: &DeviceMap, model: &BTreeMap<String, usize>, start: Bound<&str>) {
        let got: Vec<&str> = m.range(start).map(|(k, _)| k).collect();
        let want: Vec<&str> = model
            .range::<String, _>((start.map(str::to_string), Bound::Unbounded))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(got, want, "from {start:?}");
    }

    /// Same order, same answers as a `BTreeMap<String, _>`, for ids that share their first 16
    /// bytes and ids that do not.
    #[test]
    fn orders_and_finds_ids_as_a_map_of_strings_does() {
        let mut m = DeviceMap::default();
        let mut model = BTreeMap::new();
        for (n, id) in ids().into_iter().enumerate() {
            let d = super::super::durable::blank_device(&id, 1);
            let replaced = m.insert(id.clone(), d).is_some();
            assert_eq!(replaced, model.insert(id, n).is_some());
        }
        assert_eq!(m.len(), model.len());
        let got: Vec<&str> = m.range(Bound::Unbounded).map(|(id, _)| id).collect();
        let want: Vec<&str> = model.keys().map(String::as_str).collect();
        assert_eq!(got, want);
        for id in model.keys() {
            assert_eq!(m.get(id).map(|d| d.id.as_str()), Some(id.as_str()));
            assert_same_from(&m, &model, Bound::Excluded(id));
            let from: Vec<&str> = m.range(Bound::Included(id)).map(|(k, _)| k).take(3).collect();
            assert_eq!(from.first(), Some(&id.as_str()));
        }
        for missing in
            ["", "fanout-00000", "fridge-000000000001-", "0123456789abcdef\u{0}", "zzz", "nul\u{0}\u{0}"]
        {
            assert!(m.get(missing).is_none(), "{missing:?}");
            assert_same_from(&m, &model, Bound::Included(missing));
        }
        for id in ids().iter().step_by(3) {
            assert!(m.remove(id).is_some());
            model.remove(id);
            assert!(m.get_mut(id).is_none());
        }
        assert_eq!(m.values().count(), model.len());
        let got: Vec<&str> = m.range(Bound::Unbounded).map(|(id, _)| id).collect();
        assert_eq!(got, model.keys().map(String::as_str).collect::<Vec<_>>());
    }
}
