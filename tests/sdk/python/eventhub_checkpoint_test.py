"""A checkpointed Event Hubs processor against the built-in Event Hub-compatible endpoint: the unmodified
Python `azure-eventhub` `EventHubConsumerClient` with a checkpoint store (`BlobCheckpointStore` from
`azure-eventhub-checkpointstoreblob`) in Azurite's blob service, fed by a device using `azure-iot-device`.

A device sends N messages; a processor (load balancing and ownership through the store) receives them from
every partition and checkpoints each event, then is closed. The device sends M more; a new processor with
the same store resumes from the checkpoints and must see exactly the M new messages, none of the first N.
Azurite (npm `azurite`, `azurite-blob --inMemoryPersistence`, port 0) is started by this script from
`AZURITE_BLOB`, the binary the Rust harness found in its Node SDK cache. Run by the Rust harness as
`python3 tests/sdk/python/eventhub_checkpoint_test.py`. Prints one line per check; exits 1 on the first failure.
"""

import re
import subprocess
import sys
import threading
import time

import requests
from azure.eventhub import EventHubConsumerClient
from azure.eventhub.extensions.checkpointstoreblob import BlobCheckpointStore
from azure.iot.device import IoTHubDeviceClient, Message

from common import REQUEST_TIMEOUT_S, CheckFailed, check, check_equal, env, registry_manager, run_main

SCRIPT = "eventhub_checkpoint_test"
WATCHDOG_S = 170
RECEIVE_S = 60
# After the expected messages arrived, how long the resumed processor keeps listening for any it should
# not get again (a bounded observation window, not a wait for readiness).
QUIET_S = 3
FIRST, SECOND = 5, 3
CONTAINER = "eventhub-checkpoints"
# Azurite's documented well-known development account.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def start_azurite():
    """Starts azurite-blob on a free port; returns the process and its blob connection string once it
    listens (read from its own startup line)."""
    proc = subprocess.Popen(
        [env("AZURITE_BLOB"), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
         "--skipApiVersionCheck", "--disableProductStyleUrl"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        m = re.search(r"listens on (http://127\.0\.0\.1:\d+)", line)
        if m:
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            url = m.group(1)
            cs = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                  f"BlobEndpoint={url}/devstoreaccount1;")
            check(f"Azurite's blob service listens on {url}", True)
            return proc, cs
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise CheckFailed("azurite-blob did not report that it listens")


def send(client, prefix, start, count):
    for i in range(start, start + count):
        msg = Message(f'{{"n":{i}}}')
        msg.message_id = f"{prefix}-{i}"
        client.send_message(msg)
    check(f"the device sent messages {start}..{start + count - 1} over MQTT", True)


def process(eh_cs, blob_cs, device_id, want, what):
    """Runs a checkpointing processor until `want` events of `device_id` arrived (then QUIET_S more);
    returns the message ids it got, in order."""
    store = BlobCheckpointStore.from_connection_string(blob_cs, CONTAINER)
    client = EventHubConsumerClient.from_connection_string(
        eh_cs, consumer_group="$Default", checkpoint_store=store, connection_verify=env("IOTHUB_CA_FILE"),
        load_balancing_interval=1, partition_ownership_expiration_interval=5,
    )
    got, errors = [], []
    enough = threading.Event()

    def on_event(context, event):
        if event is None:
            return
        if event.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
            got.append(event.message_id)
        context.update_checkpoint(event)
        if len(got) >= want:
            enough.set()

    def on_error(context, err):
        errors.append(f"{getattr(context, 'partition_id', None)}: {err!r}")

    worker = threading.Thread(
        target=client.receive, kwargs={"on_event": on_event, "on_error": on_error, "starting_position": "-1"},
        daemon=True,
    )
    worker.start()
    arrived = enough.wait(RECEIVE_S)
    if arrived:
        time.sleep(QUIET_S)
    client.close()
    worker.join(30)
    store.close()
    check(f"{what}: {want} events within {RECEIVE_S} s", arrived, f"got {got}; errors {errors}")
    return [m if isinstance(m, str) else m.decode() for m in got]


def run():
    hub_cs = env("IOTHUB_CONNECTION_STRING")
    prefix = env("TEST_DEVICE_PREFIX")
    device_id = f"{prefix}-ckpt"
    azurite, blob_cs = start_azurite()
    try:
        from azure.eventhub.extensions.checkpointstoreblob._vendor.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(blob_cs).create_container(CONTAINER)
        check(f"created the checkpoint container {CONTAINER}", True)
        manager = registry_manager(hub_cs)
        device = manager.create_device_with_sas(device_id, None, None, "enabled")
        host = dict(p.split("=", 1) for p in hub_cs.split(";") if p)["HostName"]
        client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName={host};DeviceId={device_id};SharedAccessKey={device.authentication.symmetric_key.primary_key}"
        )
        client.connect()
        strings = requests.get(f"{env('IOTHUB_HTTP_URL')}/emulator/connection-strings",
                               timeout=REQUEST_TIMEOUT_S).json()
        eh_cs = strings["eventHubCompatible"]

        send(client, prefix, 0, FIRST)
        first = process(eh_cs, blob_cs, device_id, FIRST, "the first processor")
        check_equal("the first processor got the first messages, once each, in order", first,
                    [f"{prefix}-{i}" for i in range(FIRST)])
        store = BlobCheckpointStore.from_connection_string(blob_cs, CONTAINER)
        namespace = eh_cs.split("sb://", 1)[1].split("/", 1)[0]
        entity = dict(p.split("=", 1) for p in eh_cs.split(";") if p)["EntityPath"]
        checkpoints = list(store.list_checkpoints(namespace, entity, "$Default"))
        store.close()
        check("the store holds a checkpoint (offset and sequence number) for the device's partition",
              any(c.get("sequence_number") is not None and c.get("offset") is not None for c in checkpoints),
              checkpoints)

        send(client, prefix, FIRST, SECOND)
        client.shutdown()
        second = process(eh_cs, blob_cs, device_id, SECOND, "the restarted processor")
        check_equal("the restarted processor resumed after the checkpoint: exactly the new messages", second,
                    [f"{prefix}-{i}" for i in range(FIRST, FIRST + SECOND)])
    finally:
        azurite.kill()
        azurite.wait(10)


if __name__ == "__main__":
    sys.exit(run_main(SCRIPT, WATCHDOG_S, run))
