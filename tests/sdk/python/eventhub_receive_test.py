"""The built-in Event Hub-compatible endpoint with the unmodified Python `azure-eventhub` SDK (pyamqp),
fed by a device using the unmodified `azure-iot-device` SDK over MQTT.

A device sends telemetry with application and system properties; `EventHubConsumerClient.receive` from
every partition (starting at the beginning of the stream, with the Event Hub-compatible connection string
the emulator lists at `/emulator/connection-strings`) must see each message with its body, properties,
device id and the IoT Hub annotations, in the partition the hub runtime information lists. Then the
IoT Hub connection string is turned into the Event Hubs one by following IoT Hub's `amqp:link:redirect`,
as the SDK's own sample does (`iot_hub_connection_string_receive_async.py`, uamqp), and a consumer
client built from it reads the same messages; last, a client on AMQP over WebSocket (443,
`/$servicebus/websocket/`) does too. Run by the Rust harness as
`python3 tests/sdk/python/eventhub_receive_test.py`. Prints one line per check; exits 1 on the first
failure.
"""

import base64
import hashlib
import hmac
import re
import sys
import threading
import time
import urllib.parse

import requests
from azure.eventhub import EventHubConsumerClient, TransportType
from azure.iot.device import IoTHubDeviceClient, Message

from common import REQUEST_TIMEOUT_S, CheckFailed, check, check_equal, env, registry_manager, run_main

SCRIPT = "eventhub_receive_test"
WATCHDOG_S = 150
RECEIVE_S = 30
COUNT = 3


def parse_connection_string(cs):
    return dict(part.split("=", 1) for part in cs.split(";") if part)


def send_telemetry(hub_cs, device_id, prefix):
    manager = registry_manager(hub_cs)
    device = manager.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key
    host = parse_connection_string(hub_cs)["HostName"]
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={host};DeviceId={device_id};SharedAccessKey={key}"
    )
    client.connect()
    for i in range(COUNT):
        msg = Message(f'{{"n":{i}}}')
        msg.message_id = f"{prefix}-{i}"
        msg.content_type = "application/json"
        msg.content_encoding = "utf-8"
        msg.custom_properties["index"] = str(i)
        msg.custom_properties["firmwareChannel"] = "beta"
        client.send_message(msg)
    client.shutdown()
    check(f"device {device_id} sent {COUNT} messages over MQTT", True)


def consumer(eh_cs, consumer_group, **kwargs):
    """The SDK client. pyamqp trusts certifi's bundle, not SSL_CERT_FILE, unless it is given the CA
    with its documented `connection_verify` option."""
    return EventHubConsumerClient.from_connection_string(
        eh_cs, consumer_group=consumer_group, connection_verify=env("IOTHUB_CA_FILE"), **kwargs
    )


def receive_all(eh_cs, device_id, what, consumer_group="$Default", **kwargs):
    """Receives from every partition from the start until COUNT events of `device_id` arrived."""
    track = kwargs.pop("track_last_enqueued_event_properties", False)
    client = consumer(eh_cs, consumer_group, **kwargs)
    got = []
    done = threading.Event()

    def on_event(context, event):
        if event is None:
            return
        sysprops = event.system_properties
        if sysprops.get(b"iothub-connection-device-id") == device_id.encode():
            got.append((context.partition_id, event))
            if track:
                runtime.append(context.last_enqueued_event_properties)
            if len(got) >= COUNT:
                done.set()

    runtime = []
    worker = threading.Thread(
        target=client.receive,
        kwargs={"on_event": on_event, "starting_position": "-1", "track_last_enqueued_event_properties": track},
        daemon=True,
    )
    worker.start()
    done.wait(RECEIVE_S)
    client.close()
    worker.join(10)
    check_equal(f"{what}: events received from {device_id}", len(got), COUNT)
    if track:
        last = runtime[-1] or {}
        check(f"{what}: last_enqueued_event_properties (runtime metric)",
              last.get("sequence_number") is not None and last.get("enqueued_time") is not None, runtime)
    return client, got


def check_events(eh_cs, got, device_id, prefix):
    client = consumer(eh_cs, "$Default")
    props = client.get_eventhub_properties()
    check_equal("get_eventhub_properties: partition ids", props["partition_ids"], ["0", "1", "2", "3"])
    check("get_eventhub_properties: created_at is a datetime", props["created_at"].year >= 2020, props)
    partitions = {p for p, _ in got}
    check_equal("a device's events all come from one partition", len(partitions), 1)
    partition = partitions.pop()
    info = client.get_partition_properties(partition)
    last = got[-1][1]
    check_equal("partition properties: id", info["id"], partition)
    check_equal("partition properties: not empty", info["is_empty"], False)
    check("partition properties: last sequence number covers the events",
          info["last_enqueued_sequence_number"] >= last.sequence_number, info)
    client.close()
    for i, (_, event) in enumerate(got):
        what = f"event {i}"
        check_equal(f"{what}: body", event.body_as_str(), f'{{"n":{i}}}')
        check_equal(f"{what}: application properties keep their names and values",
                    {k: event.properties.get(k) for k in (b"index", b"firmwareChannel")},
                    {b"index": str(i).encode(), b"firmwareChannel": b"beta"})
        check_equal(f"{what}: message id", event.message_id, f"{prefix}-{i}")
        check_equal(f"{what}: content type", event.content_type, "application/json")
        sysprops = event.system_properties
        check_equal(f"{what}: iothub-connection-device-id", sysprops.get(b"iothub-connection-device-id"),
                    device_id.encode())
        check_equal(f"{what}: iothub-message-source", sysprops.get(b"iothub-message-source"), b"Telemetry")
        auth = sysprops.get(b"iothub-connection-auth-method", b"")
        check(f"{what}: iothub-connection-auth-method names a device SAS", b'"scope":"device"' in auth, auth)
        check(f"{what}: iothub-connection-auth-generation-id",
              bool(sysprops.get(b"iothub-connection-auth-generation-id")), sysprops)
        check(f"{what}: enqueued time and iothub-enqueuedtime",
              event.enqueued_time is not None and b"iothub-enqueuedtime" in sysprops, sysprops)
        check(f"{what}: offset is decimal text", event.offset.isdigit(), event.offset)
    seqs = [e.sequence_number for _, e in got]
    check_equal("sequence numbers increase by one within the partition", seqs, list(range(seqs[0], seqs[0] + COUNT)))


def follow_redirect(hub_cs):
    """The Event Hubs sample's conversion of an IoT Hub connection string (uamqp, SASL PLAIN,
    `amqp:link:redirect`), unmodified but for reading the connection string from a variable."""
    from uamqp import ReceiveClient, Source
    from uamqp.errors import LinkRedirect
    from urllib.parse import quote_plus, urlencode

    def generate_sas_token(uri, policy, key, expiry=None):
        if not expiry:
            expiry = time.time() + 3600
        encoded_uri = quote_plus(uri)
        ttl = int(expiry)
        sign_key = "%s\n%d" % (encoded_uri, ttl)
        signature = base64.b64encode(hmac.HMAC(base64.b64decode(key), sign_key.encode("utf-8"), hashlib.sha256).digest())
        result = {"sr": uri, "sig": signature, "se": str(ttl)}
        if policy:
            result["skn"] = policy
        return "SharedAccessSignature " + urlencode(result)

    parts = parse_connection_string(hub_cs)
    hostname, key_name, key = parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"]
    iot_hub_name = hostname.split(".")[0]
    operation = "/messages/events/ConsumerGroups/{}/Partitions/{}".format("$Default", 0)
    username = "{}@sas.root.{}".format(key_name, iot_hub_name)
    sas_token = generate_sas_token(hostname, key_name, key)
    uri = "amqps://{}:{}@{}{}".format(quote_plus(username), quote_plus(sas_token), hostname, operation)
    receive_client = ReceiveClient(Source(uri))
    try:
        receive_client.receive_message_batch(max_batch_size=1)
    except LinkRedirect as redirect:
        receive_client.close()
        fully_qualified_name = redirect.hostname.decode("utf-8")
        eh_name = re.search(r":\d+\/.*/ConsumerGroups", str(redirect.address)).group(0).split("/")[1]
        return "Endpoint=sb://{}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={}".format(
            fully_qualified_name, key_name, key, eh_name
        )
    raise CheckFailed("attaching to messages/events on the IoT hub did not raise LinkRedirect")


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    prefix = env("TEST_DEVICE_PREFIX")
    device_id = f"{prefix}-eh"
    send_telemetry(hub_cs, device_id, prefix)
    strings = requests.get(f"{env('IOTHUB_HTTP_URL')}/emulator/connection-strings", timeout=REQUEST_TIMEOUT_S).json()
    eh_cs = strings["eventHubCompatible"]
    check("the emulator lists an Event Hub-compatible connection string", eh_cs.startswith("Endpoint=sb://"), eh_cs)
    _, got = receive_all(eh_cs, device_id, "EventHubConsumerClient.receive from every partition",
                         track_last_enqueued_event_properties=True)
    check_events(eh_cs, got, device_id, prefix)

    redirected = follow_redirect(hub_cs)
    check_equal("the redirect leads to the listed Event Hub-compatible endpoint",
                parse_connection_string(redirected)["Endpoint"], parse_connection_string(eh_cs)["Endpoint"])
    check_equal("the redirect names the Event Hub-compatible entity",
                parse_connection_string(redirected)["EntityPath"], parse_connection_string(eh_cs)["EntityPath"])
    receive_all(redirected, device_id, "a consumer client built from the redirect")
    receive_all(eh_cs, device_id, "AMQP over WebSocket on 443 (/$servicebus/websocket/)",
                transport_type=TransportType.AmqpOverWebsocket)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
