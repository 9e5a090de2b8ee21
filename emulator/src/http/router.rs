//! Maps a method and path to a [`Route`]. IoT Hub matches paths case-insensitively
//! (`deviceBound`, `devicebound`) while device ids stay case-sensitive, so the fixed words are
//! compared ignoring case and each segment is percent-decoded on its own. Empty segments are
//! dropped, so `/devices/` and `/devices` are the same route (Node's `Registry.list()` sends the
//! trailing slash).

use percent_encoding::percent_decode_str;

/// What a request is for, with the path parameters it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/health` (plain port).
    Health,
    /// `/ca.pem` (plain port).
    CaPem,
    /// `/metrics` (plain port): Prometheus text format (see `crate::metrics`).
    Metrics,
    /// `/emulator/telemetry` (plain port): recorded D2C messages.
    Telemetry,
    /// `/emulator/connection-strings` (plain port): the policies' connection strings.
    ConnectionStrings,
    /// `/emulator/event-hub` (plain port): the built-in endpoint's runtime information (GET).
    EventHub,
    /// `/emulator/consumer-groups` (plain port): the built-in endpoint's consumer groups (GET).
    ConsumerGroups,
    /// `/emulator/consumer-groups/{name}` (plain port): one consumer group (PUT, GET, DELETE).
    ConsumerGroup(String),
    /// `/emulator/ftp/faults` (plain port): the FTP server's fault knobs (GET, PUT).
    FtpFaults,
    /// `/emulator/time` (plain port): hub time (GET) and time travel (POST).
    Time,
    /// `/emulator/throttle` (plain port): the tier throttle's settings and counters (GET).
    Throttle,
    /// `/emulator/x509-cas` (plain port): trusted device CAs (GET lists, POST adds PEM).
    X509Cas,
    /// `/` (plain port): redirects to `/dashboard`.
    Root,
    /// `/dashboard` (plain port): the dashboard page.
    Dashboard,
    /// `/emulator/dashboard/{part}` (plain port): the dashboard's JSON (`overview`, `devices`,
    /// `device`).
    DashboardApi(String),
    /// `/devices`: list (GET), bulk (POST).
    Devices,
    /// `/devices/query`.
    Query,
    /// `/devices/{id}`.
    Device(String),
    /// `/devices/{id}/commands`: purge.
    DeviceCommands(String),
    /// `/devices/{id}/messages/deviceBound`: device receive (GET), service send (POST, extension).
    DeviceBound(String),
    /// `/devices/{id}/messages/deviceBound/{lockToken}`: complete or reject (DELETE).
    DeviceBoundLock(String, String),
    /// `/devices/{id}/messages/deviceBound/{lockToken}/abandon` (POST).
    DeviceBoundAbandon(String, String),
    /// `/devices/{id}/messages/events`: D2C (POST).
    DeviceEvents(String),
    /// `/devices/{id}/modules`: list a device's modules (GET).
    Modules(String),
    /// `/devices/{id}/modules/{mid}`: a module identity (PUT, GET, DELETE).
    Module(String, String),
    /// `/twins/{id}/modules/{mid}`: a module twin (GET, PATCH, PUT).
    ModuleTwin(String, String),
    /// `/twins/{id}/modules/{mid}/methods`: a module direct method (POST).
    ModuleMethods(String, String),
    /// `/statistics/devices`.
    StatsDevices,
    /// `/statistics/service`.
    StatsService,
    /// `/twins/{id}`.
    Twin(String),
    /// `/twins/{id}/methods`.
    TwinMethods(String),
    /// `/messages/serviceBound/feedback`.
    Feedback,
    /// `/messages/serviceBound/feedback/{lockToken}`.
    FeedbackLock(String),
    /// `/messages/serviceBound/feedback/{lockToken}/abandon`.
    FeedbackAbandon(String),
    /// `/configurations`: list (GET, `?top=N`).
    Configurations,
    /// `/configurations/testQueries` (POST).
    ConfigurationTestQueries,
    /// `/configurations/{id}`: create or update (PUT), read (GET), delete (DELETE).
    Configuration(String),
    /// `/jobs/v2/{jobId}`: create (PUT) or read (GET) a scheduled job.
    Job(String),
    /// `/jobs/v2/{jobId}/cancel` (POST).
    JobCancel(String),
    /// `/jobs/v2/query` (GET): the jobs query.
    JobsQuery,
    /// DPS device API: `PUT /{idScope}/registrations/{registrationId}/register`.
    DpsRegister(String, String),
    /// DPS device API: `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    DpsOperation(String, String, String),
    /// DPS service API: `/enrollments/{id}` (`group: false`) or `/enrollmentGroups/{id}`.
    DpsEnrollment {
        /// An enrollment group.
        group: bool,
        /// Its id.
        id: String,
    },
    /// DPS service API: `POST /enrollments/query` or `/enrollmentGroups/query`.
    DpsEnrollmentQuery {
        /// Enrollment groups.
        group: bool,
    },
    /// DPS service API: `/registrations/{id}` (device registration state).
    DpsRegistration(String),
    /// A part of IoT Hub's API the emulator does not implement; names it.
    NotImplemented(&'static str),
    /// No such route.
    Unknown,
}

impl Route {
    /// The Device Provisioning Service's routes (device and service API), see `crate::dps`.
    pub fn is_dps(&self) -> bool {
        matches!(
            self,
            Route::DpsRegister(..)
                | Route::DpsOperation(..)
                | Route::DpsEnrollment { .. }
                | Route::DpsEnrollmentQuery { .. }
                | Route::DpsRegistration(_)
        )
    }

    /// The emulator's own endpoints (not IoT Hub's): served on the plain port only.
    pub fn is_emulator_own(&self) -> bool {
        matches!(self, Route::Health | Route::CaPem | Route::Metrics) || self.is_admin_api()
    }

    /// The `/emulator/*` admin routes `--disable-admin-api` turns off (and the dashboard page that
    /// reads them).
    pub fn is_admin_api(&self) -> bool {
        matches!(
            self,
            Route::Telemetry
                | Route::ConnectionStrings
                | Route::X509Cas
                | Route::EventHub
                | Route::ConsumerGroups
                | Route::ConsumerGroup(_)
                | Route::FtpFaults
                | Route::Time
                | Route::Throttle
                | Route::Root
                | Route::Dashboard
                | Route::DashboardApi(_)
        )
    }
}

/// Splits `path` into percent-decoded, non-empty segments.
pub fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Resolves `path` to a route.
pub fn route(path: &str) -> Route {
    let segs = segments(path);
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [] => Route::Root,
        [d] if eq(d, "dashboard") => Route::Dashboard,
        [e, d, part] if eq(e, "emulator") && eq(d, "dashboard") => {
            Route::DashboardApi(part.to_ascii_lowercase())
        }
        [h] if eq(h, "health") => Route::Health,
        [m] if eq(m, "metrics") => Route::Metrics,
        [c] if eq(c, "ca.pem") => Route::CaPem,
        [e, t] if eq(e, "emulator") && eq(t, "telemetry") => Route::Telemetry,
        [e, c] if eq(e, "emulator") && eq(c, "connection-strings") => Route::ConnectionStrings,
        [e, h] if eq(e, "emulator") && eq(h, "event-hub") => Route::EventHub,
        [e, c] if eq(e, "emulator") && eq(c, "consumer-groups") => Route::ConsumerGroups,
        [e, c, name] if eq(e, "emulator") && eq(c, "consumer-groups") => {
            Route::ConsumerGroup(name.to_string())
        }
        [e, f, x] if eq(e, "emulator") && eq(f, "ftp") && eq(x, "faults") => Route::FtpFaults,
        [e, t] if eq(e, "emulator") && eq(t, "time") => Route::Time,
        [e, t] if eq(e, "emulator") && eq(t, "throttle") => Route::Throttle,
        [e, x] if eq(e, "emulator") && eq(x, "x509-cas") => Route::X509Cas,
        [d] if eq(d, "devices") => Route::Devices,
        [d, q] if eq(d, "devices") && eq(q, "query") => Route::Query,
        [d, id] if eq(d, "devices") => Route::Device(id.to_string()),
        [d, id, c] if eq(d, "devices") && eq(c, "commands") => Route::DeviceCommands(id.to_string()),
        [d, id, m] if eq(d, "devices") && eq(m, "modules") => Route::Modules(id.to_string()),
        [d, id, m, mid] if eq(d, "devices") && eq(m, "modules") => {
            Route::Module(id.to_string(), mid.to_string())
        }
        [d, _, f, ..] if eq(d, "devices") && eq(f, "files") => Route::NotImplemented("file upload"),
        [d, id, m, b] if eq(d, "devices") && eq(m, "messages") && eq(b, "devicebound") => {
            Route::DeviceBound(id.to_string())
        }
        [d, id, m, b, lock] if eq(d, "devices") && eq(m, "messages") && eq(b, "devicebound") => {
            Route::DeviceBoundLock(id.to_string(), lock.to_string())
        }
        [d, id, m, b, lock, a]
            if eq(d, "devices") && eq(m, "messages") && eq(b, "devicebound") && eq(a, "abandon") =>
        {
            Route::DeviceBoundAbandon(id.to_string(), lock.to_string())
        }
        [d, id, m, e] if eq(d, "devices") && eq(m, "messages") && eq(e, "events") => {
            Route::DeviceEvents(id.to_string())
        }
        [st, d] if eq(st, "statistics") && eq(d, "devices") => Route::StatsDevices,
        [st, sv] if eq(st, "statistics") && eq(sv, "service") => Route::StatsService,
        [t, id] if eq(t, "twins") => Route::Twin(id.to_string()),
        [t, id, m] if eq(t, "twins") && eq(m, "methods") => Route::TwinMethods(id.to_string()),
        [t, id, m, mid] if eq(t, "twins") && eq(m, "modules") => {
            Route::ModuleTwin(id.to_string(), mid.to_string())
        }
        [t, id, m, mid, x] if eq(t, "twins") && eq(m, "modules") && eq(x, "methods") => {
            Route::ModuleMethods(id.to_string(), mid.to_string())
        }
        [m, s, f] if eq(m, "messages") && eq(s, "servicebound") && eq(f, "feedback") => Route::Feedback,
        [m, s, f, lock] if eq(m, "messages") && eq(s, "servicebound") && eq(f, "feedback") => {
            Route::FeedbackLock(lock.to_string())
        }
        [m, s, f, lock, a]
            if eq(m, "messages") && eq(s, "servicebound") && eq(f, "feedback") && eq(a, "abandon") =>
        {
            Route::FeedbackAbandon(lock.to_string())
        }
        [j, v, q] if eq(j, "jobs") && eq(v, "v2") && eq(q, "query") => Route::JobsQuery,
        [j, v, id] if eq(j, "jobs") && eq(v, "v2") => Route::Job(id.to_string()),
        [j, v, id, c] if eq(j, "jobs") && eq(v, "v2") && eq(c, "cancel") => Route::JobCancel(id.to_string()),
        [j, ..] if eq(j, "jobs") => Route::NotImplemented("import/export jobs"),
        [c] if eq(c, "configurations") => Route::Configurations,
        [c, t] if eq(c, "configurations") && eq(t, "testQueries") => Route::ConfigurationTestQueries,
        [c, id] if eq(c, "configurations") => Route::Configuration(id.to_string()),
        [d, _, a] if eq(d, "devices") && eq(a, "applyConfigurationContent") => {
            Route::NotImplemented("applyConfigurationContent (IoT Edge deployments)")
        }
        [d, ..] if eq(d, "digitaltwins") => Route::NotImplemented("digital twins"),
        [e, q] if (eq(e, "enrollments") || eq(e, "enrollmentGroups")) && eq(q, "query") => {
            Route::DpsEnrollmentQuery { group: eq(e, "enrollmentGroups") }
        }
        [e, id] if eq(e, "enrollments") || eq(e, "enrollmentGroups") => {
            Route::DpsEnrollment { group: eq(e, "enrollmentGroups"), id: id.to_string() }
        }
        [r, id] if eq(r, "registrations") => Route::DpsRegistration(id.to_string()),
        [scope, r, reg, x] if eq(r, "registrations") && eq(x, "register") => {
            Route::DpsRegister(scope.to_string(), reg.to_string())
        }
        [scope, r, reg, o, op] if eq(r, "registrations") && eq(o, "operations") => {
            Route::DpsOperation(scope.to_string(), reg.to_string(), op.to_string())
        }
        _ => Route::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_ignore_case_of_fixed_words_only() {
        assert_eq!(route("/devices/"), Route::Devices);
        assert_eq!(route("/DEVICES"), Route::Devices);
        assert_eq!(route("/devices/Dev1"), Route::Device("Dev1".into()));
        assert_eq!(route("/devices/query"), Route::Query);
        assert_eq!(route("/devices/d%231/messages/deviceBound"), Route::DeviceBound("d#1".into()));
        assert_eq!(route("/devices/d/messages/devicebound"), Route::DeviceBound("d".into()));
        assert_eq!(
            route("/devices/d/messages/deviceBound/abc/abandon"),
            Route::DeviceBoundAbandon("d".into(), "abc".into())
        );
        assert_eq!(
            route("/devices/d/messages/deviceBound/abc"),
            Route::DeviceBoundLock("d".into(), "abc".into())
        );
        assert_eq!(route("/devices/d/messages/events"), Route::DeviceEvents("d".into()));
        assert_eq!(route("/devices/d/commands"), Route::DeviceCommands("d".into()));
        assert_eq!(route("/twins/d"), Route::Twin("d".into()));
        assert_eq!(route("/twins/d/methods"), Route::TwinMethods("d".into()));
        assert_eq!(route("/messages/serviceBound/feedback"), Route::Feedback);
        assert_eq!(route("/messages/servicebound/feedback/t/abandon"), Route::FeedbackAbandon("t".into()));
        assert_eq!(route("/statistics/devices"), Route::StatsDevices);
        assert_eq!(route("/jobs/v2/x"), Route::Job("x".into()));
        assert_eq!(route("/jobs/v2/j%2B1/cancel"), Route::JobCancel("j+1".into()));
        assert_eq!(route("/jobs/v2/query"), Route::JobsQuery);
        assert_eq!(route("/jobs/create"), Route::NotImplemented("import/export jobs"));
        assert_eq!(route("/devices/d/modules/m"), Route::Module("d".into(), "m".into()));
        assert_eq!(route("/devices/d/Modules/"), Route::Modules("d".into()));
        assert_eq!(route("/twins/d/modules/m%24x"), Route::ModuleTwin("d".into(), "m$x".into()));
        assert_eq!(route("/twins/d/modules/m/methods"), Route::ModuleMethods("d".into(), "m".into()));
        assert_eq!(route("/devices/d/modules/m/extra"), Route::Unknown);
        assert_eq!(route("/configurations"), Route::Configurations);
        assert_eq!(route("/configurations/"), Route::Configurations, "C# sends /configurations/?top=N");
        assert_eq!(route("/configurations/testQueries"), Route::ConfigurationTestQueries);
        assert_eq!(route("/configurations/fw-1.0"), Route::Configuration("fw-1.0".into()));
        assert_eq!(
            route("/devices/edge1/applyConfigurationContent"),
            Route::NotImplemented("applyConfigurationContent (IoT Edge deployments)")
        );
        assert_eq!(route("/nothing"), Route::Unknown);
        assert_eq!(
            route("/0ne1/registrations/d-1/register"),
            Route::DpsRegister("0ne1".into(), "d-1".into())
        );
        assert_eq!(
            route("/0ne1/registrations/d-1/operations/5.a"),
            Route::DpsOperation("0ne1".into(), "d-1".into(), "5.a".into())
        );
        assert_eq!(route("/enrollmentgroups/g"), Route::DpsEnrollment { group: true, id: "g".into() });
        assert_eq!(route("/enrollments/query"), Route::DpsEnrollmentQuery { group: false });
        assert_eq!(route("/registrations/r"), Route::DpsRegistration("r".into()));
        assert_eq!(route("/health"), Route::Health);
        assert_eq!(route("/emulator/ftp/faults"), Route::FtpFaults);
        assert_eq!(route("/emulator/time"), Route::Time);
        assert_eq!(route("/emulator/throttle"), Route::Throttle);
        assert_eq!(route("/emulator/x509-cas"), Route::X509Cas);
        assert_eq!(route("/"), Route::Root);
        assert_eq!(route("/Dashboard"), Route::Dashboard);
        assert_eq!(route("/emulator/dashboard/Overview"), Route::DashboardApi("overview".into()));
    }
}
