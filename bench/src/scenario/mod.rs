//! Scenario files: the TOML format users write to state a situation (fleet, offline windows,
//! faults, the release, expectations) and get a verdict. Parsed in two stages: [`raw`] mirrors the
//! file (serde, unknown keys refused), [`plan`] validates it into a [`ScenarioPlan`]. Every error
//! names the file, the key and what is allowed. `scenarios/README.md` documents every key.

pub mod plan;
pub mod raw;

use std::path::Path;

pub use plan::{
    Action, DurationDist, Event, Expectations, FleetPlan, HubPlan, PackagePlan, RolloutPlan, ScenarioError,
    ScenarioPlan, Target, TimeMode, UpdateRetryPlan,
};

/// Parses scenario `text`, read from `file` (used in errors and as the default name).
pub fn parse_str(file: &str, text: &str) -> Result<ScenarioPlan, ScenarioError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ScenarioError {
        file: file.to_string(),
        key: "(file)".into(),
        message: format!("not valid TOML: {}", e.message()),
    })?;
    let raw: raw::RawScenario = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ScenarioError {
            file: file.to_string(),
            key: if key == "." { "(file)".into() } else { key },
            message: e.into_inner().message().to_string(),
        }
    })?;
    plan::plan(file, raw)
}

/// Reads and parses the scenario file at `path`.
pub fn load(path: &Path) -> Result<ScenarioPlan, ScenarioError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: file.clone(),
        key: "(file)".into(),
        message: format!("cannot read it: {e}"),
    })?;
    parse_str(&file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = "[fleet]\ndevices = 10\n";

    fn err(text: &str) -> ScenarioError {
        parse_str("t.toml", text).unwrap_err()
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let p = parse_str("dir/mini.toml", MINIMAL).unwrap();
        assert_eq!(p.name, "mini");
        assert_eq!(p.fleet.devices, 10);
        assert_eq!(p.fleet.ids.id(3), "device-3");
        assert_eq!(p.fleet.initial_version, "1.0.0");
        assert_eq!(p.time_limit, Duration::from_secs(600));
        assert!(matches!(p.hub, HubPlan::Embedded { .. }));
    }

    #[test]
    fn time_mode_is_real_unless_compressed_is_asked_for() {
        assert_eq!(parse_str("t.toml", MINIMAL).unwrap().time, TimeMode::Real);
        let p = parse_str("t.toml", &format!("time = \"compressed\"\n{MINIMAL}")).unwrap();
        assert_eq!(p.time, TimeMode::Compressed);
        let e = err(&format!("time = \"warp\"\n{MINIMAL}"));
        assert_eq!(e.key, "time");
        assert!(e.message.contains("\"real\" or \"compressed\""), "{e}");
    }

    #[test]
    fn update_retry_defaults_parses_and_names_its_keys() {
        let p = parse_str("t.toml", MINIMAL).unwrap();
        assert_eq!(p.fleet.update_retry, UpdateRetryPlan { on_reconnect: true, check_every: None });
        let p = parse_str(
            "t.toml",
            "[fleet]\ndevices = 10\nupdate_retry = { on_reconnect = false, check_every = \"30m\" }\n",
        )
        .unwrap();
        assert_eq!(
            p.fleet.update_retry,
            UpdateRetryPlan { on_reconnect: false, check_every: Some(Duration::from_secs(1800)) }
        );
        let e = err("[fleet]\ndevices = 10\nupdate_retry = { check_every = \"often\" }\n");
        assert_eq!(e.key, "fleet.update_retry.check_every");
        assert!(e.message.contains("not a duration"), "{e}");
        let e = err("[fleet]\ndevices = 10\nupdate_retry = { check_every = \"0s\" }\n");
        assert_eq!(e.key, "fleet.update_retry.check_every");
        let e = err("[fleet]\ndevices = 10\nupdate_retry = { every = \"1m\" }\n");
        assert_eq!(e.key, "fleet.update_retry.every");
        assert!(e.message.contains("`on_reconnect` or `check_every`"), "{e}");
        let e = err("[fleet]\ndevices = 10\nupdate_retry = { on_reconnect = \"yes\" }\n");
        assert_eq!(e.key, "fleet.update_retry.on_reconnect");
    }

    #[test]
    fn id_pattern_pads_to_the_largest_index() {
        let p = parse_str("t.toml", "[fleet]\ndevices = 1000\nid_pattern = \"fridge-{n}-x\"\n").unwrap();
        assert_eq!(p.fleet.ids.id(7), "fridge-007-x");
        let e = err("[fleet]\ndevices = 2\nid_pattern = \"fridge {n}\"\n");
        assert_eq!(e.key, "fleet.id_pattern");
        assert!(e.message.contains("IoT Hub refuses"), "{e}");
        assert_eq!(err("[fleet]\ndevices = 2\nid_pattern = \"fridge\"\n").key, "fleet.id_pattern");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = err("[fleet]\ndevices = 10\ndevice_count = 3\n");
        assert_eq!(e.key, "fleet.device_count");
        assert!(e.message.contains("expected one of") && e.message.contains("`devices`"), "{e}");
        let e = err("[fleet]\ndevices = \"ten\"\n");
        assert_eq!(e.key, "fleet.devices");
        let e = err("[fleet\n");
        assert_eq!(e.key, "(file)");
        assert!(e.to_string().starts_with("t.toml: (file): not valid TOML"), "{e}");
    }

    #[test]
    fn events_are_validated_per_action() {
        let base = "[fleet]\ndevices = 10\n[[package]]\nversion = \"2.0.0\"\nsize = \"1MiB\"\n";
        let ok = format!(
            "{base}[[event]]\nat = \"30s\"\naction = \"release\"\nversion = \"2.0.0\"\nttl = \"10m\"\n\
             [[event]]\nat = \"0s\"\naction = \"offline\"\nshare = 0.3\nduration = {{ distribution = \"uniform\", min = \"30s\", max = \"300s\" }}\n"
        );
        let p = parse_str("t.toml", &ok).unwrap();
        assert_eq!(p.packages[0].size, 1024 * 1024);
        assert!(
            matches!(p.events[0].action, Action::Offline { share, .. } if share == 0.3),
            "sorted by time"
        );
        assert!(
            matches!(&p.events[1].action, Action::Release { version, ttl: Some(t), target: Target::All, pipeline: false } if version == "2.0.0" && *t == Duration::from_secs(600))
        );

        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"reboot\"\n"));
        assert_eq!(e.key, "event[0].action");
        assert!(e.message.contains("release, offline"), "{e}");
        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"release\"\nversion = \"9\"\n"));
        assert_eq!(e.key, "event[0].version");
        assert!(e.message.contains("known: 2.0.0"), "{e}");
        let e = err(&format!(
            "{base}[[event]]\nat = \"1s\"\naction = \"release\"\nversion = \"2.0.0\"\nshare = 0.5\n"
        ));
        assert_eq!(e.key, "event[0].share");
        assert!(e.message.contains("takes version, ttl, target"), "{e}");
        let e = err(&format!("{base}[[event]]\nat = \"soon\"\naction = \"send\"\n"));
        assert_eq!(e.key, "event[0].at");
        let e = err(&format!(
            "{base}[[event]]\nat = \"1s\"\naction = \"offline\"\nshare = 1.5\nduration = \"1m\"\n"
        ));
        assert_eq!(e.key, "event[0].share");
        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"send\"\ntarget = \"nobody\"\n"));
        assert_eq!(e.key, "event[0].target");
        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"ftp-fault\"\n"));
        assert!(e.message.contains("at least one"), "{e}");
        let p = parse_str(
            "t.toml",
            &format!(
                "{base}[[event]]\nat = \"1s\"\naction = \"ftp-fault\"\nrefuse_sessions = 0.5\n\
                 [[event]]\nat = \"2s\"\naction = \"link-flap\"\nftp = false\ncount = 2\n"
            ),
        )
        .unwrap();
        assert!(matches!(p.events[0].action, Action::FtpFault { refuse_sessions: Some(s), .. } if s == 0.5));
        assert!(matches!(p.events[1].action, Action::LinkFlap { ftp: false, count: 2, .. }));
        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"ftp-fault\"\nrefuse_sessions = 2\n"));
        assert_eq!(e.key, "event[0].refuse_sessions");
        let e = err(&format!("{base}[[event]]\nat = \"1s\"\naction = \"send\"\nftp = true\n"));
        assert_eq!(e.key, "event[0].ftp");
    }

    #[test]
    fn targets_groups_and_where_clauses() {
        let text = "[fleet]\ndevices = 10\n[[fleet.group]]\nname = \"canary\"\nshare = 0.1\n\
                    [[event]]\nat = \"1s\"\naction = \"send\"\ntarget = \"canary\"\n\
                    [[event]]\nat = \"2s\"\naction = \"send\"\ntarget = \"tags.group = 'canary'\"\n";
        let p = parse_str("t.toml", text).unwrap();
        assert!(
            matches!(&p.events[0].action, Action::Send { target: Target::Group(g), .. } if g == "canary")
        );
        assert!(matches!(&p.events[1].action, Action::Send { target: Target::Where(_), .. }));
        let e =
            err("[fleet]\ndevices = 10\n[[event]]\nat = \"1s\"\naction = \"send\"\ntarget = \"tags.x = \"\n");
        assert!(e.message.contains("not a valid WHERE clause"), "{e}");
        let e = err(
            "[fleet]\ndevices = 10\n[[fleet.group]]\nname = \"a\"\nshare = 0.7\n[[fleet.group]]\nname = \"b\"\nshare = 0.7\n",
        );
        assert_eq!(e.key, "fleet.group");
    }

    #[test]
    fn hub_modes_and_expectations() {
        let e = err("[hub]\nmode = \"cloud\"\n[fleet]\ndevices = 1\n");
        assert_eq!(e.key, "hub.mode");
        let e = err("[hub]\nconnection_string = \"x\"\n[fleet]\ndevices = 1\n");
        assert_eq!(e.key, "hub.connection_string");
        let e = err("[hub]\nmode = \"external\"\n[fleet]\ndevices = 1\n");
        assert_eq!(e.key, "hub.connection_string");
        let e = err("[fleet]\ndevices = 1\n[expect]\nfinal_version = \"3.0\"\n");
        assert_eq!(e.key, "expect.final_version");
        let p = parse_str(
            "t.toml",
            "[fleet]\ndevices = 1\n[expect]\nfinal_version = \"1.0.0\"\n[expect.latency]\np99 = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(p.expect.latency.p99, Some(Duration::from_secs(120)));
    }

    #[test]
    fn external_hub_and_fleet_keys() {
        const EXT: &str = "[hub]\nmode = \"external\"\nconnection_string = \"HostName=hub;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5\"\nca_file = \"ca.pem\"\nhttp_url = \"http://hub:8080\"\n";
        let p = parse_str("t.toml", &format!("{EXT}packages_dir = \"/data/packages\"\nftp_port = 2122\n[fleet]\ndevices = 100\nid_pattern = \"fridge-{{n}}\"\nmode = \"external\"\n")).unwrap();
        let HubPlan::External { packages_dir, amqp_port, mqtt_port, ftp_port, .. } = &p.hub else {
            panic!("not external: {:?}", p.hub)
        };
        assert_eq!(packages_dir.as_deref(), Some("/data/packages"));
        assert_eq!((*amqp_port, *mqtt_port, *ftp_port), (5671, 8883, 2122));
        assert!(p.fleet.external);
        assert_eq!(p.fleet.ids.fleet_run_pattern(), "fridge-{n:02}");
        assert_eq!(err(&format!("{EXT}mqtt_port = 0\n[fleet]\ndevices = 1\n")).key, "hub.mqtt_port");
        assert_eq!(
            err(&format!("{EXT}feedback_interval = \"1s\"\n[fleet]\ndevices = 1\n")).key,
            "hub.feedback_interval"
        );
        assert_eq!(err("[hub]\npackages_dir = \"p\"\n[fleet]\ndevices = 1\n").key, "hub.packages_dir");
        let e = err("[fleet]\ndevices = 1\nmode = \"cloud\"\n");
        assert_eq!((e.key.as_str(), e.message.contains("\"external\"")), ("fleet.mode", true));
        assert!(!parse_str("t.toml", MINIMAL).unwrap().fleet.external);
    }

    #[test]
    fn child_hub_keys_and_hub_restart_events() {
        let p = parse_str(
            "t.toml",
            "[hub]\nmode = \"child\"\nbinary = \"/bin/hub\"\nfeedback_interval = \"1s\"\n[fleet]\ndevices = 2\n\
             [[event]]\nat = \"1s\"\naction = \"hub-restart\"\n\
             [[event]]\nat = \"2s\"\naction = \"hub-restart\"\nkind = \"graceful\"\n",
        )
        .unwrap();
        let HubPlan::Child { binary, data_dir, persist, feedback_interval } = &p.hub else {
            panic!("not a child hub: {:?}", p.hub)
        };
        assert_eq!((binary.as_deref(), data_dir.as_deref(), *persist), (Some("/bin/hub"), None, true));
        assert_eq!(*feedback_interval, Duration::from_secs(1));
        use crate::child_hub::StopKind;
        assert_eq!(p.events[0].action, Action::HubRestart { kind: StopKind::Crash }, "crash is the default");
        assert_eq!(p.events[1].action, Action::HubRestart { kind: StopKind::Graceful });
        let e = err(
            "[hub]\nmode = \"child\"\n[fleet]\ndevices = 1\n[[event]]\nat = \"1s\"\naction = \"hub-restart\"\nkind = \"nap\"\n",
        );
        assert_eq!(e.key, "event[0].kind");
        assert_eq!(err("[hub]\npersist = true\n[fleet]\ndevices = 1\n").key, "hub.persist");
        assert_eq!(err("[hub]\nmode = \"child\"\ntier = \"S1\"\n[fleet]\ndevices = 1\n").key, "hub.tier");
        let e = err("[fleet]\ndevices = 1\n[[event]]\nat = \"1s\"\naction = \"send\"\nkind = \"crash\"\n");
        assert_eq!(e.key, "event[0].kind");
        // A restart needs a hub the runner owns as a child process.
        let p =
            parse_str("t.toml", "[fleet]\ndevices = 1\n[[event]]\nat = \"1s\"\naction = \"hub-restart\"\n")
                .unwrap();
        let e = crate::runner::check_supported(&p).unwrap_err().to_string();
        assert!(e.starts_with("event[0].action: 'hub-restart' restarts a hub the runner owns"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(plan::parse_size("64KiB"), Some(65536));
        assert_eq!(plan::parse_size("10kB"), Some(10_000));
        assert_eq!(plan::parse_size("123"), Some(123));
        assert_eq!(plan::parse_size("1.5MiB"), None);
        assert_eq!(plan::parse_size("12 parsecs"), None);
    }
}
