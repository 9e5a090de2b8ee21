//! Resource scopes: does a token's `sr` cover the thing being accessed, and which identity does a
//! device token name?
//!
//! Both functions take *decoded* resource URIs (`host`, `host/devices`, `host/devices/dev1`,
//! `host/devices/dev1/modules/m1`) and normalise what the SDKs vary on: a scheme prefix (uamqp's
//! CBS audience is `https://localhost`, a CBS name can be `amqps://host:5671/`), a `:port` on the
//! host (Python with `HostName=h:port` signs `h:port`) and a trailing `/`.
//!
//! Case: the host and the literal segments (`devices`, `modules`, `messages`, ...) compare
//! case-insensitively, like the C# scope helper (reference §1.3.4). Device and module ids — any
//! segment right after a `devices` or `modules` segment — compare case-SENSITIVELY, because IoT
//! Hub device ids are case-sensitive (reference §1.3.4): a token for `Dev1` must not open `dev1`.

use super::SasError;

/// True when a token whose decoded `sr` is `token_resource` may be used for `target`: the
/// hosts match (ignoring scheme, port and case) and the token's path is a whole-segment prefix of
/// the target's path, so `h/devices/a` covers `h/devices/a/x` but not `h/devices/ab`.
pub fn scope_covers(token_resource: &str, target: &str) -> bool {
    let (token_host, token_path) = split_resource(token_resource);
    let (target_host, target_path) = split_resource(target);
    if token_host.is_empty() || !token_host.eq_ignore_ascii_case(target_host) {
        return false;
    }
    let mut targets = segments(target_path);
    let mut next_is_id = false;
    for seg in segments(token_path) {
        let Some(other) = targets.next() else {
            return false;
        };
        let same = if next_is_id { seg == other } else { seg.eq_ignore_ascii_case(other) };
        if !same {
            return false;
        }
        next_is_id = !next_is_id && is_collection(seg);
    }
    true
}

/// Whose resource a decoded `sr` names: the hub, all devices, one device or one module.
///
/// `host` and `host/devices` both give `device_id: None`; use [`scope_covers`] to tell whether
/// a policy token scoped to `host/devices` covers a given device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceTarget {
    /// The hub host, lowercased, without scheme or port.
    pub host: String,
    /// The device the resource names, exactly as written (ids are case-sensitive).
    pub device_id: Option<String>,
    /// The module the resource names, if any.
    pub module_id: Option<String>,
}

impl ResourceTarget {
    /// Parses `host`, `host/devices`, `host/devices/{id}` or `host/devices/{id}/modules/{mid}`
    /// (literals in any case; scheme, port and trailing `/` tolerated). Anything else, such as
    /// `host/foo`, `host/devices/{id}/modules` or an empty id, is a [`SasError::BadResource`].
    pub fn parse(resource: &str) -> Result<Self, SasError> {
        let bad = |reason| SasError::BadResource { resource: resource.to_owned(), reason };
        let (host, path) = split_resource(resource);
        if host.is_empty() {
            return Err(bad("no host name"));
        }
        let segs: Vec<&str> = segments(path).collect();
        let (device_id, module_id) = match segs.as_slice() {
            [] => (None, None),
            [d] if is_devices(d) => (None, None),
            [d, id] if is_devices(d) => (Some(nonempty(id, bad)?), None),
            [d, id, m, mid] if is_devices(d) && m.eq_ignore_ascii_case("modules") => {
                (Some(nonempty(id, bad)?), Some(nonempty(mid, bad)?))
            }
            _ => return Err(bad("expected {host}[/devices[/{id}[/modules/{moduleId}]]]")),
        };
        Ok(Self { host: host.to_ascii_lowercase(), device_id, module_id })
    }
}

/// An id segment as an owned string, or the caller's error when it is empty.
fn nonempty(id: &str, bad: impl Fn(&'static str) -> SasError) -> Result<String, SasError> {
    if id.is_empty() { Err(bad("empty device or module id")) } else { Ok(id.to_owned()) }
}

fn is_devices(seg: &str) -> bool {
    seg.eq_ignore_ascii_case("devices")
}

/// Segments after which an id follows.
fn is_collection(seg: &str) -> bool {
    is_devices(seg) || seg.eq_ignore_ascii_case("modules")
}

/// Splits a decoded resource into (host without port, path without leading or trailing `/`),
/// dropping a `scheme://` prefix.
fn split_resource(resource: &str) -> (&str, &str) {
    let rest = match resource.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => rest,
        _ => resource,
    };
    let rest = rest.trim_end_matches('/');
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    (strip_port(authority), path)
}

/// `host:5671` → `host`, `[::1]:5671` → `[::1]`; anything else unchanged.
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

/// Path segments; an empty path has none (an empty segment inside a path is kept).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(move |_| !path.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_scope_covers_everything_on_the_hub() {
        assert!(scope_covers("h", "h"));
        assert!(scope_covers("h", "h/devices"));
        assert!(scope_covers("h", "h/devices/a/modules/m"));
        assert!(!scope_covers("h", "other"));
        assert!(!scope_covers("h", "hh/devices/a"));
    }

    #[test]
    fn prefix_is_by_whole_segment() {
        assert!(scope_covers("h/devices/a", "h/devices/a"));
        assert!(scope_covers("h/devices/a", "h/devices/a/x"));
        assert!(scope_covers("h/devices/a", "h/devices/a/modules/m"));
        assert!(!scope_covers("h/devices/a", "h/devices/ab"));
        assert!(!scope_covers("h/devices/ab", "h/devices/a"));
        assert!(!scope_covers("h/devices/a", "h/devices"));
        assert!(!scope_covers("h/devices/a", "h"));
        assert!(scope_covers("h/devices", "h/devices/anything"));
        assert!(!scope_covers("h/devices", "h/twins/a"));
    }

    #[test]
    fn host_and_literals_ignore_case_but_ids_do_not() {
        assert!(scope_covers("LocalHost/DEVICES/dev1", "localhost/devices/dev1"));
        assert!(scope_covers("h/devices/dev1", "h/Devices/dev1/Messages/Events"));
        assert!(!scope_covers("h/devices/Dev1", "h/devices/dev1"));
        assert!(!scope_covers("h/devices/dev1", "h/devices/DEV1"));
        assert!(scope_covers("h/devices/d/MODULES/m", "h/devices/d/modules/m"));
        assert!(!scope_covers("h/devices/d/modules/M", "h/devices/d/modules/m"));
    }

    #[test]
    fn device_named_like_a_literal_is_still_case_sensitive() {
        assert!(scope_covers("h/devices/devices", "h/devices/devices/modules/x"));
        assert!(!scope_covers("h/devices/devices", "h/devices/Devices"));
        assert!(scope_covers("h/devices/modules/Modules/m", "h/devices/modules/modules/m"));
        assert!(!scope_covers("h/devices/modules/modules/M", "h/devices/modules/modules/m"));
    }

    #[test]
    fn tolerates_scheme_port_and_trailing_slash() {
        assert!(scope_covers("localhost", "https://localhost"));
        assert!(scope_covers("https://localhost", "localhost/devices/d"));
        assert!(scope_covers("localhost", "amqps://localhost:5671/"));
        assert!(scope_covers("localhost:18443", "localhost"));
        assert!(scope_covers("localhost:18443", "https://localhost:18443/devices/d"));
        assert!(scope_covers("h/devices/d/", "h/devices/d"));
        assert!(scope_covers("h/devices/d", "h/devices/d/"));
        assert!(scope_covers("[::1]:5671", "[::1]/devices/d"));
        assert!(!scope_covers("", "h"));
        assert!(!scope_covers("https://", "h"));
    }

    #[test]
    fn resource_target_shapes() {
        let t = ResourceTarget::parse("LocalHost:8883/devices/Dev1").unwrap();
        assert_eq!(t.host, "localhost");
        assert_eq!(t.device_id.as_deref(), Some("Dev1"));
        assert_eq!(t.module_id, None);
        let t = ResourceTarget::parse("amqps://h/Devices/d/Modules/m/").unwrap();
        assert_eq!((t.device_id.as_deref(), t.module_id.as_deref()), (Some("d"), Some("m")));
        let t = ResourceTarget::parse("h").unwrap();
        assert_eq!((t.host.as_str(), t.device_id), ("h", None));
        assert_eq!(ResourceTarget::parse("h/devices").unwrap().device_id, None);
    }

    #[test]
    fn resource_target_rejects_other_shapes() {
        for bad in [
            "",
            "/devices/d",
            "h/foo",
            "h/devices/d/modules",
            "h/devices/d/messages/events",
            "h/devices//modules/m",
            "h/devices/d/modules//",
            "h/devices/d/x/m",
        ] {
            let err = ResourceTarget::parse(bad).unwrap_err();
            assert!(matches!(err, SasError::BadResource { .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn port_stripping_only_strips_ports() {
        assert_eq!(strip_port("h:123"), "h");
        assert_eq!(strip_port("h:"), "h:");
        assert_eq!(strip_port("h:abc"), "h:abc");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("[::1]:1"), "[::1]");
    }
}
