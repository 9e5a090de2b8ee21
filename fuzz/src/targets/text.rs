//! Text targets: SAS tokens, connection strings, the query language, twin JSON patches and
//! scenario files. Inputs are bytes read as UTF-8 (lossily, so every input reaches the parser);
//! each target checks a property stronger than "does not panic" where the API gives one.

use iothub_emulator::hub::{Section, Twin};
use iothub_emulator::query::Query;
use iothub_emulator::sas::{ConnectionString, ResourceTarget, SasToken, make_token, scope_covers};
use serde_json::{Value, json};

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

/// A base64 key for signing (32 zero bytes).
const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn lines(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn words(items: &[&str]) -> Vec<Vec<u8>> {
    lines(items)
}

fn sas_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![
        make_token("localhost/devices/dev1", KEY, None, 4_000_000_000).unwrap_or_default(),
        make_token("localhost", KEY, Some("iothubowner"), 1_700_000_000).unwrap_or_default(),
        "SharedAccessSignature skn=service&sr=localhost&se=1&sig=a%2Bb%3D".to_owned(),
        "  SharedAccessSignature sr=a%2Fb&&sig=x&se=18446744073709551615&extra=1  ".to_owned(),
    ];
    seeds.retain(|s| !s.is_empty());
    seeds.into_iter().map(String::into_bytes).collect()
}

fn check_sas() -> Check {
    Box::new(|input| {
        let text = untracked(|| String::from_utf8_lossy(input));
        let Ok(token) = SasToken::parse(&text) else {
            return Ok(Outcome::Rejected);
        };
        let _ = token.verify(KEY);
        let _ = token.verify(&text);
        let _ = token.is_expired(u64::MAX, u64::MAX);
        let _ = scope_covers(&token.resource, "localhost/devices/dev1/modules/m1");
        let _ = ResourceTarget::parse(&token.resource);
        untracked(|| resign(&token))?;
        Ok(Outcome::Accepted)
    })
}

/// Re-signing a parsed token's fields gives a token that parses to them and verifies.
fn resign(token: &SasToken) -> Result<(), String> {
    let resigned = make_token(&token.resource, KEY, token.key_name.as_deref(), token.expiry_secs)
        .map_err(|e| format!("cannot re-sign a parsed token: {e}"))?;
    let again = SasToken::parse(&resigned).map_err(|e| format!("a re-signed token does not parse: {e}"))?;
    if again.resource != token.resource
        || again.expiry_secs != token.expiry_secs
        || again.key_name != token.key_name
    {
        return Err(format!("a re-signed token parses to other fields: {token:?} vs {again:?}"));
    }
    if !again.verify(KEY) {
        return Err(format!("a re-signed token does not verify: {resigned}"));
    }
    Ok(())
}

fn connection_string_seeds() -> Vec<Vec<u8>> {
    lines(&[
        "HostName=localhost;DeviceId=dev1;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA",
        "HostName=h;DeviceId=d;ModuleId=m;x509=true;GatewayHostName=g",
        "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h&sig=s&se=1",
    ])
}

fn check_connection_string() -> Check {
    Box::new(|input| {
        let text = untracked(|| String::from_utf8_lossy(input));
        let Ok(cs) = ConnectionString::parse(&text) else {
            return Ok(Outcome::Rejected);
        };
        // Display writes a string that parses back to the same value.
        untracked(|| {
            let shown = cs.to_string();
            let again =
                ConnectionString::parse(&shown).map_err(|e| format!("`{shown}` does not parse back: {e}"))?;
            if again != cs {
                return Err(format!("`{shown}` parses to {again:?}, not {cs:?}"));
            }
            Ok(())
        })?;
        let _ = cs.resource_uri();
        let _ = cs.token(4_000_000_000);
        Ok(Outcome::Accepted)
    })
}

fn query_seeds() -> Vec<Vec<u8>> {
    lines(&[
        "SELECT * FROM devices",
        "SELECT * FROM devices WHERE tags.region = 'US' AND properties.reported.fw >= 2",
        "SELECT deviceId, tags.site AS site FROM devices WHERE NOT (status = 'enabled' OR tags.n < -1.5e3)",
        "SELECT COUNT() AS total FROM devices WHERE properties.desired.$version > 1",
        "select * from devices.modules where IS_DEFINED(tags.x) and tags.list != [1, 'a', true, null]",
        "SELECT * FROM devices WHERE ((((tags.a = 1))))",
    ])
}

fn query_dictionary() -> Vec<Vec<u8>> {
    words(&[
        " SELECT ",
        " FROM ",
        " WHERE ",
        " AND ",
        " OR ",
        " NOT ",
        " AS ",
        "COUNT()",
        "devices",
        "devices.modules",
        "devices.jobs",
        "tags.",
        "properties.reported.",
        "'",
        "\"",
        "(",
        ")",
        "[",
        "]",
        ",",
        "=",
        "!=",
        "<>",
        "<=",
        ">=",
        "*",
        ".",
        "$",
        "1e308",
        "-",
        "IS_DEFINED(",
        "null",
        "true",
        "((((((((((",
        "NOT NOT NOT NOT ",
    ])
}

fn twins() -> Vec<Value> {
    vec![
        json!({"deviceId": "d1", "status": "enabled", "tags": {"region": "US", "n": 3, "list": [1, "a"]},
               "properties": {"desired": {"$version": 2}, "reported": {"fw": 2.5, "$version": 4}}}),
        json!({"deviceId": "d2", "tags": null, "properties": {"reported": {"fw": "x"}}}),
        json!({}),
    ]
}

fn check_query() -> Check {
    let twins = twins();
    Box::new(move |input| {
        let text = untracked(|| String::from_utf8_lossy(input));
        let Ok(q) = Query::parse(&text) else {
            return Ok(Outcome::Rejected);
        };
        let rows = q.run(&twins);
        let matching = twins.iter().filter(|t| q.matches(t)).count();
        if !q.is_count() && rows.len() != matching {
            return Err(format!("run returned {} rows but {matching} twins match", rows.len()));
        }
        for t in &twins {
            let _ = q.project(t);
        }
        let _ = (q.filter_roots(), q.select_roots(), q.count_row(matching), q.item_type());
        Ok(Outcome::Accepted)
    })
}

fn twin_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (section, body) in [
        (b'd', r#"{"telemetryInterval": 30, "fw": {"version": "1.2.3", "url": null}}"#),
        (b'r', r#"{"fw": {"state": "applied", "log": ["a", "b"]}, "temp": 21.5, "ok": true}"#),
        (b't', r#"{"region": "US", "site": {"building": 4, "floor": {"n": 1, "x": {"y": {"z": {}}}}}}"#),
        (b'D', r#"{"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}"#),
    ] {
        let mut s = vec![section];
        s.extend_from_slice(body.as_bytes());
        seeds.push(s);
    }
    seeds
}

fn twin_dictionary() -> Vec<Vec<u8>> {
    words(&[
        "{",
        "}",
        "[",
        "]",
        "\"$version\"",
        "\"$metadata\"",
        "\"a.b\"",
        "\"a b\"",
        "\"$x\"",
        "null",
        ":",
        ",",
        "1e999",
        "-0",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":",
        "[[[[[[[[[[",
    ])
}

fn check_twin() -> Check {
    Box::new(|input| {
        let Some((&selector, body)) = input.split_first() else {
            return Ok(Outcome::Rejected);
        };
        let section = match selector % 3 {
            0 => Section::Tags,
            1 => Section::Desired,
            _ => Section::Reported,
        };
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return Ok(Outcome::Rejected);
        };
        let mut twin = Twin::new(1);
        let result = if selector & 0x20 == 0 {
            twin.patch(section, &patch, 2)
        } else {
            twin.replace(section, &patch, 2)
        };
        let Ok(_) = result else {
            return Ok(Outcome::Rejected);
        };
        let _ = (twin.desired_json(), twin.reported_json(), twin.properties_json(), twin.etag_str());
        // A merge patch is idempotent: applied twice, the second changes nothing.
        untracked(|| {
            let version = twin.version;
            match twin.patch(section, &patch, 3) {
                Ok(false) => {}
                Ok(true) => {
                    return Err("applying an accepted patch a second time changed the twin".to_owned());
                }
                Err(e) => return Err(format!("an accepted patch is refused the second time: {e}")),
            }
            if twin.version != version {
                return Err("a no-op patch bumped the twin version".into());
            }
            Ok(Outcome::Accepted)
        })
    })
}

fn scenario_seeds() -> Vec<Vec<u8>> {
    [
        include_str!("../../../scenarios/quickstart.toml"),
        include_str!("../../../scenarios/flaky-network.toml"),
        include_str!("../../../scenarios/offline-fridges.toml"),
        include_str!("../../../scenarios/phased-rollout.toml"),
        include_str!("../../../scenarios/queue-overflow.toml"),
        include_str!("../../../scenarios/ttl-expiry.toml"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn scenario_dictionary() -> Vec<Vec<u8>> {
    words(&[
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        "=",
        "\n",
        "\"",
        "'''",
        "\"\"\"",
        "[fleet]\n",
        "[hub]\n",
        "[release]\n",
        "[[events]]\n",
        "[expect]\n",
        "count = ",
        "at = \"",
        "duration = \"",
        "1h",
        "0s",
        "999999999999999h",
        "a = [[[[[[[[[[[[[[[[",
        "a = {b = {c = {d = {e = {f = {",
        "1979-05-27T07:32:00Z",
        "inf",
        "nan",
        "0x7fffffffffffffff",
        "18446744073709551616",
        "\"100%\"",
        "\"1 MiB\"",
        "\"18446744073709551615 GiB\"",
    ])
}

fn check_scenario() -> Check {
    Box::new(|input| {
        let text = untracked(|| String::from_utf8_lossy(input));
        Ok(match testbench::scenario::parse_str("fuzz.toml", &text) {
            Ok(_) => Outcome::Accepted,
            Err(_) => Outcome::Rejected,
        })
    })
}

/// `sas_token`: `SasToken::parse` and the checks done with a parsed token.
pub const SAS_TOKEN: Target = Target {
    name: "sas_token",
    about: "sas::SasToken::parse, verify, scope_covers, ResourceTarget::parse; re-signed tokens verify",
    seeds: sas_seeds,
    dictionary: || {
        words(&["SharedAccessSignature ", "sr=", "&sig=", "&se=", "&skn=", "%", "%2F", "%25", "&&", "=", " "])
    },
    max_len: 4096,
    alloc_k: 16,
    alloc_c: 16 * 1024,
    make: check_sas,
};

/// `connection_string`: `ConnectionString::parse`.
pub const CONNECTION_STRING: Target = Target {
    name: "connection_string",
    about: "sas::ConnectionString::parse; Display parses back to the same value",
    seeds: connection_string_seeds,
    dictionary: || {
        words(&[
            "HostName=",
            "DeviceId=",
            "ModuleId=",
            "SharedAccessKeyName=",
            "SharedAccessKey=",
            "SharedAccessSignature=",
            "x509=",
            "GatewayHostName=",
            ";",
            "=",
            "true",
            "FALSE",
            " ",
        ])
    },
    max_len: 4096,
    alloc_k: 32,
    alloc_c: 16 * 1024,
    make: check_connection_string,
};

/// `query`: the query language.
pub const QUERY: Target = Target {
    name: "query",
    about: "query::Query::parse, then run/matches/project over three twins",
    seeds: query_seeds,
    dictionary: query_dictionary,
    max_len: 9000,
    alloc_k: 128,
    alloc_c: 64 * 1024,
    make: check_query,
};

/// `twin_json`: JSON body, then the twin patch rules.
pub const TWIN_JSON: Target = Target {
    name: "twin_json",
    about: "serde_json, then hub::Twin::patch/replace (first byte picks the section); patches are idempotent",
    seeds: twin_seeds,
    dictionary: twin_dictionary,
    max_len: 40 * 1024,
    alloc_k: 64,
    alloc_c: 64 * 1024,
    make: check_twin,
};

/// `scenario`: the bench crate's scenario parser.
pub const SCENARIO: Target = Target {
    name: "scenario",
    about: "testbench::scenario::parse_str (TOML, then the plan's validation)",
    seeds: scenario_seeds,
    dictionary: scenario_dictionary,
    max_len: 16 * 1024,
    alloc_k: 128,
    alloc_c: 256 * 1024,
    make: check_scenario,
};
