//! Unit tests for the sans-IO configuration rules: parsing, priority resolution, content merge,
//! the notification diff and the status counts.

use super::*;
use crate::hub::IfMatch;

fn config(id: &str, priority: i64, seq: u64, content: Value) -> Configuration {
    let body = json!({ "id": id, "content": { "deviceContent": content }, "targetCondition": "*", "priority": priority });
    let input = ConfigInput::parse(id, &body).unwrap();
    let (kind, content, writes) = input.content.unwrap();
    Configuration {
        id: Arc::from(id),
        kind,
        schema_version: Value::Null,
        labels: Map::new(),
        content,
        writes,
        target_condition: input.target_condition,
        target: input.target,
        priority,
        metrics: BTreeMap::new(),
        created: 0,
        updated: 0,
        etag: 1,
        seq,
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn higher_priority_wins_each_path_and_lower_is_partially_applied() {
    let low = config(
        "low",
        1,
        1,
        json!({ "properties.desired.fw": {"v": "1.0"}, "properties.desired.interval": 10 }),
    );
    let high = config("high", 5, 2, json!({ "properties.desired.fw": {"v": "2.0"} }));
    let r = resolve(&[&low, &high]);
    let writes: Vec<(String, Value)> = r.writes.iter().map(|(p, v)| (p.join("."), (*v).clone())).collect();
    assert_eq!(writes, vec![("fw".to_string(), json!({"v": "2.0"})), ("interval".to_string(), json!(10))]);
    assert_eq!(
        r.statuses,
        vec![(Arc::from("high"), ConfigStatus::Applied), (Arc::from("low"), ConfigStatus::Applied)]
    );
    // A lower-priority configuration whose only path is taken is just targeted.
    let shadowed = config("shadowed", 0, 3, json!({ "properties.desired.fw.v": "0.9" }));
    let r = resolve(&[&shadowed, &high]);
    assert_eq!(r.writes.len(), 1);
    assert_eq!(r.statuses[1], (Arc::from("shadowed"), ConfigStatus::Targeted));
}

#[test]
fn on_equal_priority_the_most_recently_created_wins() {
    let older = config("a-older", 3, 1, json!({ "properties.desired.x": 1 }));
    let newer = config("b-newer", 3, 2, json!({ "properties.desired.x": 2 }));
    for order in [[&older, &newer], [&newer, &older]] {
        let r = resolve(&order);
        assert_eq!(r.writes, vec![(&["x".to_string()][..], &json!(2))]);
        assert_eq!(r.statuses[0], (Arc::from("a-older"), ConfigStatus::Targeted));
    }
}

#[test]
fn apply_writes_winners_and_takes_back_stale_paths() {
    let desired = obj(json!({ "user": true, "fw": {"v": "1.0", "extra": 1}, "old": {"deep": 1} }));
    let old_paths: Vec<Box<str>> = vec!["fw".into(), "old.deep".into()];
    let fw = json!({"v": "2.0"});
    let fw_path = vec!["fw".to_string()];
    let (out, paths) = apply(&desired, &old_paths, &[(&fw_path, &fw)]);
    // fw is replaced as a whole; old.deep is removed and its emptied parent with it; the user's
    // own property stays.
    assert_eq!(out, obj(json!({ "user": true, "fw": {"v": "2.0"} })));
    assert_eq!(paths, vec![Box::from("fw")]);
    // No configuration left: everything they wrote goes.
    let (out, paths) = apply(&out, &paths, &[]);
    assert_eq!(out, obj(json!({ "user": true })));
    assert!(paths.is_empty());
    // A null value in content removes the property.
    let null = Value::Null;
    let user = vec!["user".to_string()];
    let (out, _) = apply(&out, &[], &[(&user, &null)]);
    assert!(out.is_empty());
}

#[test]
fn diff_is_the_merge_patch_between_two_sections() {
    let old = obj(json!({ "a": 1, "b": {"c": 1, "d": 2}, "gone": true }));
    let new = obj(json!({ "a": 1, "b": {"c": 5}, "e": "x" }));
    assert_eq!(Value::Object(diff(&old, &new)), json!({ "gone": null, "b": {"d": null, "c": 5}, "e": "x" }));
    assert!(diff(&new, &new).is_empty());
}

#[test]
fn status_counts() {
    let mk = |s: &[(&str, ConfigStatus)]| TwinConfigs {
        statuses: s.iter().map(|(i, st)| (Arc::from(*i), *st)).collect(),
        paths: vec![],
    };
    let devices = [
        mk(&[("c", ConfigStatus::Applied)]),
        mk(&[("c", ConfigStatus::Targeted), ("d", ConfigStatus::Applied)]),
        mk(&[("d", ConfigStatus::Applied)]),
        TwinConfigs::default(),
    ];
    assert_eq!(count_statuses("c", devices.iter()), (2, 1));
    assert_eq!(count_statuses("d", devices.iter()), (2, 2));
    assert_eq!(count_statuses("x", devices.iter()), (0, 0));
    assert_eq!(devices[1].to_json(), json!({"c": {"status": "targeted"}, "d": {"status": "applied"}}));
}

#[test]
fn bodies_are_validated_in_iot_hub_terms() {
    let parse = |b: Value| ConfigInput::parse("cfg", &b).map(drop).unwrap_err();
    let e = parse(json!({ "content": { "modulesContent": { "$edgeAgent": {} } } }));
    assert_eq!(e.code, ErrorCode::NotImplemented);
    assert!(e.message.contains("modulesContent"), "{}", e.message);
    // C#'s empty module members, and no device content at all, are a device configuration.
    let ok = json!({ "content": { "deviceContent": { "properties.desired.a": 1 }, "moduleContent": {}, "modulesContent": {} } });
    assert_eq!(ConfigInput::parse("cfg", &ok).unwrap().content.unwrap().2.len(), 1);
    assert!(ConfigInput::parse("cfg", &json!({ "content": {} })).unwrap().content.unwrap().2.is_empty());
    let e = parse(json!({ "content": { "deviceContent": [1] } }));
    assert!(e.message.contains("must be an object"), "{}", e.message);
    let e = parse(json!({ "content": { "deviceContent": { "tags.x": 1 } } }));
    assert!(e.message.contains("properties.desired"), "{}", e.message);
    let e = parse(
        json!({ "content": { "deviceContent": { "properties.desired.a": 1, "properties.desired.a.b": 2 } } }),
    );
    assert!(e.message.contains("overlap"), "{}", e.message);
    let e = parse(json!({ "content": { "deviceContent": { "properties.desired.s": "x".repeat(5000) } } }));
    assert!(e.message.contains("4096"), "{}", e.message);
    let e = parse(json!({ "content": { "deviceContent": {} }, "targetCondition": "tags.x = " }));
    assert!(e.message.starts_with("targetCondition is not valid"), "{}", e.message);
    let e = parse(json!({ "content": { "deviceContent": {} }, "priority": -1 }));
    assert!(e.message.contains("priority"), "{}", e.message);
    let many: Map<String, Value> =
        (0..6).map(|i| (format!("m{i}"), json!("SELECT deviceId FROM devices"))).collect();
    let e = parse(json!({ "content": { "deviceContent": {} }, "metrics": { "queries": many } }));
    assert!(e.message.contains("at most 5"), "{}", e.message);
    let e = parse(json!({ "id": "other", "content": { "deviceContent": {} } }));
    assert!(e.message.contains("does not match"), "{}", e.message);
    assert!(validate_id("Upper").is_err());
    assert!(validate_id("a b").is_err());
    assert!(validate_id(&"a".repeat(129)).is_err());
    assert!(validate_id("fw-update_1.0").is_ok());
}

#[test]
fn module_content_makes_a_module_configuration_over_devices_modules() {
    let body = |content: Value, condition: &str| json!({ "content": content, "targetCondition": condition });
    let module = json!({ "moduleContent": { "properties.desired.settings": { "k": 1 } } });
    let input = ConfigInput::parse(
        "cfg",
        &body(module.clone(), "FROM devices.modules WHERE moduleId = 'm1' AND tags.env = 'test'"),
    )
    .unwrap();
    let (kind, echoed, writes) = input.content.clone().unwrap();
    assert_eq!(kind, ConfigKind::Module);
    assert_eq!(echoed, module);
    assert_eq!(writes, vec![(vec!["settings".to_string()], json!({ "k": 1 }))]);
    let target = input.target.unwrap();
    assert_eq!(target.collection, Collection::Modules);
    assert!(target.matches(&json!({ "moduleId": "m1", "tags": { "env": "test" } })));
    assert!(!target.matches(&json!({ "moduleId": "m2", "tags": { "env": "test" } })));
    // Lower case, and the C# SDK's empty members, work too; an empty condition targets nothing.
    let csharp =
        json!({ "deviceContent": {}, "moduleContent": { "properties.desired.a": 1 }, "modulesContent": {} });
    let input = ConfigInput::parse("cfg", &body(csharp, "from devices.modules where tags.a = 1")).unwrap();
    assert_eq!(input.content.unwrap().0, ConfigKind::Module);
    assert!(ConfigInput::parse("cfg", &body(module.clone(), "")).unwrap().target.is_none());

    let refused = |content: Value, condition: &str| {
        ConfigInput::parse("cfg", &body(content, condition)).map(drop).unwrap_err()
    };
    for condition in ["tags.env = 'test'", "*", "FROM devices WHERE tags.env = 'test'"] {
        let e = refused(module.clone(), condition);
        assert_eq!(e.code, ErrorCode::ArgumentInvalid, "{condition}");
        assert!(e.message.contains("FROM devices.modules WHERE"), "{}", e.message);
    }
    let device = json!({ "deviceContent": { "properties.desired.a": 1 } });
    let e = refused(device.clone(), "FROM devices.modules WHERE tags.env = 'test'");
    assert!(e.message.contains("cannot target module twins"), "{}", e.message);
    let both = json!({ "deviceContent": { "properties.desired.a": 1 }, "moduleContent": { "properties.desired.b": 1 } });
    let e = refused(both, "");
    assert_eq!(e.code, ErrorCode::ArgumentInvalid);
    assert!(e.message.contains("not both"), "{}", e.message);
    let e = refused(json!({ "moduleContent": { "tags.x": 1 } }), "");
    assert!(e.message.starts_with("moduleContent key 'tags.x'"), "{}", e.message);
    let e = refused(module, "FROM devices.modules WHERE");
    assert!(e.message.starts_with("targetCondition is not valid"), "{}", e.message);
    // A condition naming `devices` is a device condition.
    let input = ConfigInput::parse("cfg", &body(device, "FROM devices WHERE tags.a = 1")).unwrap();
    assert_eq!(input.target.unwrap().collection, Collection::Devices);
}

#[test]
fn a_module_configuration_stays_one() {
    let condition = "FROM devices.modules WHERE tags.a = 1";
    let body = json!({ "content": { "moduleContent": { "properties.desired.x": 1 } }, "targetCondition": condition });
    let mut t = ConfigTable::default();
    let (c, _) = t.put("cfg", ConfigInput::parse("cfg", &body).unwrap(), None, 10, 100).unwrap();
    assert_eq!(c.kind, ConfigKind::Module);
    // Retargeting keeps to module twins, with or without the content in the body.
    let mut retargeted = json!({ "targetCondition": "FROM devices.modules WHERE tags.a = 2" });
    let (c, w) =
        t.put("cfg", ConfigInput::parse("cfg", &retargeted).unwrap(), Some(&IfMatch::Any), 11, 101).unwrap();
    assert!(w.retarget);
    assert_eq!(c.kind, ConfigKind::Module);
    retargeted["targetCondition"] = json!("tags.a = 2");
    let e = t
        .put("cfg", ConfigInput::parse("cfg", &retargeted).unwrap(), Some(&IfMatch::Any), 12, 102)
        .unwrap_err();
    assert!(e.message.contains("FROM devices.modules WHERE"), "{}", e.message);
    // The same paths as device content are a content change.
    let device =
        json!({ "content": { "deviceContent": { "properties.desired.x": 1 } }, "targetCondition": "" });
    let e =
        t.put("cfg", ConfigInput::parse("cfg", &device).unwrap(), Some(&IfMatch::Any), 13, 103).unwrap_err();
    assert!(e.message.contains("cannot be updated"), "{}", e.message);
    // The JSON names devices.modules in its system metric queries.
    let j = t.get("cfg").unwrap().to_json((1, 1), &BTreeMap::new());
    assert_eq!(
        j["systemMetrics"]["queries"]["targetedCount"],
        "select deviceId, moduleId FROM devices.modules WHERE tags.a = 2"
    );
    assert_eq!(
        j["systemMetrics"]["queries"]["appliedCount"],
        "select deviceId, moduleId from devices.modules where configurations.[[cfg]].status = 'Applied'"
    );
    assert_eq!(j["content"], json!({ "moduleContent": { "properties.desired.x": 1 } }));
}

#[test]
fn table_create_update_delete_with_etags() {
    let body = json!({ "content": { "deviceContent": { "properties.desired.x": 1 } }, "targetCondition": "tags.a = 1", "priority": 2 });
    let mut t = ConfigTable::default();
    let (c, w) = t.put("cfg", ConfigInput::parse("cfg", &body).unwrap(), None, 10, 100).unwrap();
    assert_eq!(w, Written { created: true, retarget: true });
    let etag = c.etag_str();
    let e = t.put("cfg", ConfigInput::parse("cfg", &body).unwrap(), None, 11, 101).unwrap_err();
    assert_eq!(e.code, ErrorCode::ConfigurationAlreadyExists);
    let stale = IfMatch::Etag("bm9wZQ==".into());
    let e = t.put("cfg", ConfigInput::parse("cfg", &body).unwrap(), Some(&stale), 11, 101).unwrap_err();
    assert_eq!(e.code, ErrorCode::PreconditionFailed);
    // Labels only: no retarget; created time kept.
    let mut labelled = body.clone();
    labelled["labels"] = json!({ "k": "v" });
    let (c2, w) = t
        .put("cfg", ConfigInput::parse("cfg", &labelled).unwrap(), Some(&IfMatch::Etag(etag)), 12, 102)
        .unwrap();
    assert_eq!(w, Written { created: false, retarget: false });
    assert_eq!((c2.created, c2.updated, c2.seq), (10, 12, c.seq));
    // Content cannot change.
    let mut changed = body.clone();
    changed["content"]["deviceContent"]["properties.desired.x"] = json!(2);
    let e =
        t.put("cfg", ConfigInput::parse("cfg", &changed).unwrap(), Some(&IfMatch::Any), 13, 103).unwrap_err();
    assert!(e.message.contains("cannot be updated"), "{}", e.message);
    let mut retargeted = body.clone();
    retargeted["priority"] = json!(9);
    let (_, w) =
        t.put("cfg", ConfigInput::parse("cfg", &retargeted).unwrap(), Some(&IfMatch::Any), 14, 104).unwrap();
    assert!(w.retarget);
    assert_eq!(t.get("nope").unwrap_err().code, ErrorCode::ConfigurationNotFound);
    assert_eq!(t.delete("cfg", Some(&stale)).unwrap_err().code, ErrorCode::PreconditionFailed);
    t.delete("cfg", None).unwrap();
    assert!(t.is_empty());
}

#[test]
fn configuration_json_has_iot_hubs_shape() {
    let mut c = config("fw", 10, 1, json!({ "properties.desired.fw": {"v": "1"} }));
    c.metrics.insert(
        "current".into(),
        Metric {
            text: "SELECT deviceId FROM devices WHERE properties.reported.fw = '1'".into(),
            query: parse_metric("SELECT deviceId FROM devices WHERE properties.reported.fw = '1'").unwrap(),
        },
    );
    let custom = BTreeMap::from([("current".to_string(), 3)]);
    let j = c.to_json((4, 2), &custom);
    assert_eq!(j["systemMetrics"]["results"], json!({ "targetedCount": 4, "appliedCount": 2 }));
    // Target `*` (every device): the query has no WHERE, so it is one the query API accepts.
    assert_eq!(j["systemMetrics"]["queries"]["targetedCount"], "select deviceId from devices");
    let q = j["systemMetrics"]["queries"]["targetedCount"].as_str().unwrap();
    assert!(crate::query::Query::parse(q).is_ok(), "{q} does not parse");
    assert_eq!(
        j["systemMetrics"]["queries"]["appliedCount"],
        "select deviceId from devices where configurations.[[fw]].status = 'Applied'"
    );
    assert_eq!(j["metrics"]["results"], json!({ "current": 3 }));
    assert_eq!(j["content"], json!({ "deviceContent": { "properties.desired.fw": {"v": "1"} } }));
    assert_eq!(j["schemaVersion"], Value::Null);
    assert!(j["createdTimeUtc"].is_string() && j["etag"].is_string());
}

#[test]
fn test_queries_reports_errors_per_query() {
    let r = test_queries(&json!({
        "targetCondition": "tags.x = ",
        "customMetricQueries": { "ok": "SELECT deviceId FROM devices WHERE tags.y = 1", "bad": "SELECT FROM" }
    }))
    .unwrap();
    assert!(r["targetConditionError"].as_str().unwrap().contains("syntax error"));
    assert!(r["customMetricQueryErrors"]["bad"].is_string());
    assert!(r["customMetricQueryErrors"].get("ok").is_none());
    let r = test_queries(&json!({ "targetCondition": "*" })).unwrap();
    assert_eq!(r, json!({ "targetConditionError": "", "customMetricQueryErrors": {} }));
    // Module conditions and metric queries over devices.modules.
    let r = test_queries(&json!({
        "targetCondition": "FROM devices.modules WHERE moduleId = 'm1' AND tags.env = 'test'",
        "customMetricQueries": {
            "ok": "SELECT deviceId, moduleId FROM devices.modules WHERE configurations.[[cfg]].status = 'Applied'",
            "bad": "SELECT deviceId FROM devices.modules WHERE",
        }
    }))
    .unwrap();
    assert_eq!(r["targetConditionError"], "");
    assert_eq!(r["customMetricQueryErrors"].as_object().unwrap().keys().collect::<Vec<_>>(), ["bad"]);
    let r = test_queries(&json!({ "targetCondition": "FROM devices.modules WHERE moduleId = " })).unwrap();
    assert!(r["targetConditionError"].as_str().unwrap().contains("syntax error"), "{r}");
}

#[test]
fn applied_count_query_reads_bracketed_ids_ignoring_case() {
    let q =
        Query::parse("select deviceId from devices where configurations.[[fw-update]].status = 'Applied'")
            .unwrap();
    assert!(q.matches(&json!({ "configurations": { "fw-update": { "status": "applied" } } })));
    assert!(!q.matches(&json!({ "configurations": { "fw-update": { "status": "targeted" } } })));
    assert!(!q.matches(&json!({ "configurations": {} })));
    assert!(Query::parse("SELECT * FROM devices WHERE tags.[[a").is_err());
    // Outside configurations.*.status, strings still compare exactly.
    let q = Query::parse("SELECT * FROM devices WHERE tags.s = 'Applied'").unwrap();
    assert!(!q.matches(&json!({ "tags": { "s": "applied" } })));
}
