//! Unit tests of the enrollment store, device authentication and the registration state machine,
//! and the MQTT session, without sockets.

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish};
use serde_json::{Value, json};

use super::mqtt::{self, DpsSession};
use super::*;
use crate::hub::{Hub, HubConfig};
use crate::sas::make_token;

const GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn hub() -> Hub {
    Hub::new(HubConfig { dps_id_scope: "0ne00000001".into(), ..HubConfig::default() })
}

fn group(hub: &Hub, id: &str, enabled: bool) {
    let body = json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
        "provisioningStatus": if enabled { "enabled" } else { "disabled" },
        "initialTwin": {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}},
    });
    hub.dps().put_enrollment(true, id, &body, hub.now()).unwrap();
}

fn token(hub: &Hub, reg: &str, key: &str, skn: Option<&str>) -> String {
    make_token(
        &format!("{}/registrations/{reg}", hub.dps().id_scope()),
        key,
        skn,
        hub.wall_now() / 1000 + 3600,
    )
    .unwrap()
}

fn connect(
    hub: &Hub,
    reg: &str,
    password: &str,
) -> Result<(DpsSession, Packet), (ConnectReturnCode, String)> {
    let mut c = Connect::new(reg);
    let user = format!("{}/registrations/{reg}/api-version=2019-03-31&ClientVersion=x", hub.dps().id_scope());
    c.set_login(user.clone(), password);
    let reg = mqtt::registration_of(&user, hub.dps().id_scope()).unwrap().to_string();
    mqtt::accept(hub, &c, &reg, None)
}

fn request(s: &mut DpsSession, hub: &Hub, topic: &str, body: &[u8]) -> (String, Value) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, body.to_vec());
    p.pkid = 7;
    let mut out = Vec::new();
    s.handle_packet(hub, Packet::Publish(p), &mut out).unwrap();
    assert!(matches!(out[0], Packet::PubAck(ref a) if a.pkid == 7));
    let (topic, payload) = mqtt::payload_of(&out[1]).unwrap();
    (topic.to_string(), serde_json::from_slice(payload).unwrap())
}

#[test]
fn derived_keys_match_the_documented_formula() {
    // Computed independently: python3 -c 'import hmac,hashlib,base64;
    // print(base64.b64encode(hmac.new(bytes(range(32)), b"dev-1", hashlib.sha256).digest()).decode())'
    let k = derive_device_key(GROUP_KEY, "dev-1").unwrap();
    assert_eq!(k, "uPrGCZtSCJ9Nt+iY0r7te47dbsu7OCYEU9tz7kQloUs=");
    assert_ne!(derive_device_key(GROUP_KEY, "dev-2").unwrap(), k);
}

#[test]
fn registration_ids_are_validated() {
    assert!(validate_registration_id("dev-1.a_b:c").is_ok());
    for bad in ["", "a/b", "ends.", &"x".repeat(129)] {
        assert_eq!(validate_registration_id(bad).unwrap_err().status, 400, "{bad}");
    }
}

#[test]
fn group_devices_authenticate_with_derived_keys_and_register_into_the_hub() {
    let hub = hub();
    group(&hub, "g1", true);
    let key = derive_device_key(GROUP_KEY, "dev-1").unwrap();
    // Python sends no skn, Node sends skn=registration; both are accepted.
    assert!(connect(&hub, "dev-1", &token(&hub, "dev-1", &key, Some("registration"))).is_ok());
    let (mut s, connack) = connect(&hub, "dev-1", &token(&hub, "dev-1", &key, None)).unwrap();
    assert!(matches!(connack, Packet::ConnAck(ref c) if c.code == ConnectReturnCode::Success));
    let (topic, v) = request(
        &mut s,
        &hub,
        "$dps/registrations/PUT/iotdps-register/?$rid=r1",
        br#"{"registrationId":"dev-1","payload":{"modelId":"dtmi:com:example:T;1"}}"#,
    );
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=r1");
    assert_eq!(v["status"], "assigned");
    let state = &v["registrationState"];
    assert_eq!(state["assignedHub"], hub.hostname());
    assert_eq!(state["deviceId"], "dev-1");
    assert_eq!(state["substatus"], "initialAssignment");
    // The device exists with the derived key, its initial twin and its model id.
    assert_eq!(hub.device_primary_key("dev-1").unwrap().as_deref(), Some(key.as_str()));
    let twin = hub.get_twin("dev-1").unwrap();
    assert_eq!(twin["tags"]["site"], "lab");
    assert_eq!(twin["properties"]["desired"]["interval"], 5);
    assert_eq!(twin["modelId"], "dtmi:com:example:T;1");
    // A poll for the operation answers the same assignment; an unknown operation is 404.
    let op = v["operationId"].as_str().unwrap();
    let (topic, polled) = request(
        &mut s,
        &hub,
        &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2&operationId={op}"),
        b" ",
    );
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=r2");
    assert_eq!(polled["registrationState"]["deviceId"], "dev-1");
    let (topic, _) = request(
        &mut s,
        &hub,
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r3&operationId=x",
        b" ",
    );
    assert_eq!(topic, "$dps/registrations/res/404/?$rid=r3");
    // Re-provisioning keeps the identity and the twin the service changed since.
    hub.update_twin("dev-1", &json!({"tags": {"site": "moved"}}), None, false).unwrap();
    let (_, again) = request(&mut s, &hub, "$dps/registrations/PUT/iotdps-register/?$rid=r4", b"{}");
    assert_eq!(again["registrationState"]["deviceId"], "dev-1");
    assert_eq!(again["registrationState"]["substatus"], "deviceDataMigrated");
    assert_eq!(hub.get_twin("dev-1").unwrap()["tags"]["site"], "moved");
    assert_eq!(hub.device_primary_key("dev-1").unwrap().as_deref(), Some(key.as_str()));
}

#[test]
fn wrong_keys_scopes_and_disabled_enrollments_are_refused() {
    let hub = hub();
    group(&hub, "g1", true);
    let key = derive_device_key(GROUP_KEY, "dev-1").unwrap();
    // Signed with the group key itself, or for another registration: CONNACK 5.
    let (code, _) = connect(&hub, "dev-1", &token(&hub, "dev-1", GROUP_KEY, None)).unwrap_err();
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (code, _) = connect(&hub, "dev-1", &token(&hub, "dev-2", &key, None)).unwrap_err();
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (code, _) = connect(&hub, "dev-1", &token(&hub, "dev-1", &key, Some("iothubowner"))).unwrap_err();
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // A disabled group: the register request gets 401 with DPS's error body, no device is made.
    group(&hub, "g1", false);
    let (mut s, _) = connect(&hub, "dev-1", &token(&hub, "dev-1", &key, None)).unwrap();
    let (topic, v) = request(&mut s, &hub, "$dps/registrations/PUT/iotdps-register/?$rid=a", b" ");
    assert_eq!(topic, "$dps/registrations/res/401/?$rid=a");
    assert_eq!(v["errorCode"], 401002);
    assert!(v["message"].as_str().unwrap().contains("disabled"));
    assert!(hub.get_device("dev-1").is_err());
}

#[test]
fn individual_enrollments_use_their_own_key_and_device_id() {
    let hub = hub();
    group(&hub, "g1", true);
    let ind = hub
        .dps()
        .put_enrollment(
            false,
            "dev-9",
            &json!({"registrationId": "dev-9", "deviceId": "thermo-9", "attestation": {"type": "symmetricKey"}}),
            hub.now(),
        )
        .unwrap();
    let key = ind["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
    // The individual enrollment wins over the group: its derived key does not verify.
    let derived = derive_device_key(GROUP_KEY, "dev-9").unwrap();
    assert!(connect(&hub, "dev-9", &token(&hub, "dev-9", &derived, None)).is_err());
    let (mut s, _) = connect(&hub, "dev-9", &token(&hub, "dev-9", &key, Some("registration"))).unwrap();
    let (_, v) = request(&mut s, &hub, "$dps/registrations/PUT/iotdps-register/?$rid=1", b" ");
    assert_eq!(v["registrationState"]["deviceId"], "thermo-9");
    assert_eq!(hub.device_primary_key("thermo-9").unwrap().as_deref(), Some(key.as_str()));
    assert_eq!(hub.dps().get_registration(&hub, "dev-9").unwrap()["deviceId"], "thermo-9");
    // A deviceId the hub refuses: the register request gets the hub's 400, not a 500.
    hub.dps()
        .put_enrollment(
            false,
            "dev-8",
            &json!({"deviceId": "bad id/x", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY}}}),
            0,
        )
        .unwrap();
    let (mut s8, _) = connect(&hub, "dev-8", &token(&hub, "dev-8", GROUP_KEY, None)).unwrap();
    let (topic, _) = request(&mut s8, &hub, "$dps/registrations/PUT/iotdps-register/?$rid=8", b" ");
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=8");
    // The store's service API: get, query, delete.
    assert_eq!(hub.dps().get_enrollment(false, "dev-9").unwrap()["deviceId"], "thermo-9");
    assert_eq!(hub.dps().query_enrollments(true, 10).as_array().unwrap().len(), 1);
    hub.dps().delete_enrollment(false, "dev-9").unwrap();
    assert_eq!(hub.dps().get_enrollment(false, "dev-9").unwrap_err().status, 404);
}

#[test]
fn bad_enrollments_and_bad_requests_are_refused_in_dps_terms() {
    let hub = hub();
    let put = |body: Value| hub.dps().put_enrollment(true, "g", &body, 0).unwrap_err().status;
    assert_eq!(put(json!({})), 400);
    assert_eq!(put(json!({"attestation": {"type": "tpm"}})), 400);
    assert_eq!(
        put(json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "x"}}})),
        400
    );
    group(&hub, "g1", true);
    let key = derive_device_key(GROUP_KEY, "d").unwrap();
    let (mut s, _) = connect(&hub, "d", &token(&hub, "d", &key, None)).unwrap();
    let (topic, _) = request(&mut s, &hub, "$dps/registrations/PUT/iotdps-register/?$rid=1", b"{");
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=1");
    let (topic, _) = request(
        &mut s,
        &hub,
        "$dps/registrations/PUT/iotdps-register/?$rid=2",
        br#"{"registrationId":"other"}"#,
    );
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=2");
    let (topic, v) = request(
        &mut s,
        &hub,
        "$dps/registrations/PUT/iotdps-register/?$rid=3",
        br#"{"payload":{"modelId":"not a dtmi"}}"#,
    );
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=3");
    assert!(v["message"].as_str().unwrap().contains("modelId"), "{v}");
    let mut out = Vec::new();
    let p = Publish::new("devices/d/messages/events/", QoS::AtLeastOnce, b"x".to_vec());
    assert!(s.handle_packet(&hub, Packet::Publish(p), &mut out).is_err());
}

fn chain_of(pems: &[&str]) -> crate::x509::ClientChain {
    let mut ders = Vec::new();
    for pem in pems {
        for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
            ders.push(c.unwrap());
        }
    }
    crate::x509::ClientChain(ders)
}

#[test]
fn x509_group_and_individual_enrollments_authenticate_by_certificate_and_create_x509_devices() {
    use crate::x509::issue;
    let hub = hub();
    let ca = issue::test_ca("DPS Group CA", 30).unwrap();
    let body = json!({"enrollmentGroupId": "xg", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": ca.cert_pem}}}}});
    let stored = hub.dps().put_enrollment(true, "xg", &body, 0).unwrap();
    assert_eq!(stored["attestation"]["type"], "x509");
    // A CA-signed device with CN = its registration id is provisioned as a certificateAuthority device,
    // and the hub then accepts its certificate.
    let dev = issue::ca_signed_device("x-1", &ca.cert_pem, &ca.key_pem, 30).unwrap();
    let chain = chain_of(&[&dev.cert_pem]);
    let cred = hub.dps().authenticate_device_x509("x-1", &chain).unwrap();
    let state = hub.dps().register(&hub, "x-1", &cred, None).unwrap();
    assert_eq!(state["registrationState"]["deviceId"], "x-1");
    assert_eq!(hub.get_device("x-1").unwrap()["authentication"]["type"], "certificateAuthority");
    assert!(hub.authenticate_x509(&chain, "x-1").is_ok());
    // CN other than the registration id, or a CA no group names: refused.
    assert_eq!(hub.dps().authenticate_device_x509("x-2", &chain).unwrap_err().status, 401);
    let rogue_ca = issue::test_ca("Rogue", 30).unwrap();
    let rogue = issue::ca_signed_device("x-3", &rogue_ca.cert_pem, &rogue_ca.key_pem, 30).unwrap();
    assert!(hub.dps().authenticate_device_x509("x-3", &chain_of(&[&rogue.cert_pem])).is_err());

    // An individual enrollment with the device's own certificate: a selfSigned device by thumbprint.
    let own = issue::self_signed_device("s-1", 30).unwrap();
    let body = json!({"registrationId": "s-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": own.cert_pem}}}}});
    hub.dps().put_enrollment(false, "s-1", &body, 0).unwrap();
    let own_chain = chain_of(&[&own.cert_pem]);
    let cred = hub.dps().authenticate_device_x509("s-1", &own_chain).unwrap();
    hub.dps().register(&hub, "s-1", &cred, None).unwrap();
    let device = hub.get_device("s-1").unwrap();
    assert_eq!(device["authentication"]["type"], "selfSigned");
    assert!(hub.authenticate_x509(&own_chain, "s-1").is_ok());
    let other = issue::self_signed_device("s-1", 30).unwrap();
    assert!(hub.dps().authenticate_device_x509("s-1", &chain_of(&[&other.cert_pem])).is_err());
    // A symmetric-key token for an X.509 enrollment is refused.
    let token = token(&hub, "s-1", GROUP_KEY, None);
    assert!(hub.dps().authenticate_device("s-1", &token, hub.wall_now() / 1000, 300).is_err());
    // A non-CA signing certificate is a 400.
    let body = json!({"enrollmentGroupId": "bad", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": own.cert_pem}}}}});
    assert_eq!(hub.dps().put_enrollment(true, "bad", &body, 0).unwrap_err().status, 400);
}
