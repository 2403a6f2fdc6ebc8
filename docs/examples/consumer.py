#!/usr/bin/env python3
"""Reads Ferry's events from an MQTT broker, in every wire form Ferry sends,
with paho-mqtt and the CloudEvents SDK, and hands on each event once.

Ferry delivers at least once: after a lost link or a restart an event may
arrive again, always with the same `id`, so a consumer deduplicates by id.
The three forms (docs/clouds.md):

- MQTT 5, binary mode: the payload is the data, every attribute a user
  property, `datacontenttype` the MQTT content type;
- MQTT 3.1.1, structured mode: the payload is the whole event as
  `application/cloudevents+json`;
- a batch (destinations with `[destination.batch]`, the cloud profiles):
  one publish whose payload is a JSON array of structured events
  (`application/cloudevents-batch+json`).

    consumer.py --host 127.0.0.1 --port 1883 --topic 'ferry/#' --count 100

prints one JSON line per new event and exits once it has seen --count
events (exit 1 if --timeout passes first).
"""

import argparse
import json
import sys
import time

import paho.mqtt.client as mqtt
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

JSON = JSONFormat()
BATCH = "application/cloudevents-batch+json"


def events_in(message):
    """The CloudEvents one MQTT message carries."""
    props = message.properties
    content_type = getattr(props, "ContentType", None) if props else None
    user = dict(getattr(props, "UserProperty", None) or []) if props else {}
    if "specversion" in user:
        # Binary mode: attributes from the user properties, data from the payload.
        attributes = dict(user)
        attributes["time"] = isoparse(attributes["time"])
        if content_type:
            attributes["datacontenttype"] = content_type
        return [CloudEvent(attributes, bytes(message.payload))]
    if (content_type or "").startswith(BATCH) or message.payload[:1] == b"[":
        return [JSON.read(None, json.dumps(e)) for e in json.loads(message.payload)]
    return [JSON.read(None, message.payload)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic", default="ferry/#")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--count", type=int, default=0, help="exit after this many distinct events (0: never)")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    args = p.parse_args()

    seen = set()
    duplicates = 0

    def on_message(_client, _userdata, message):
        nonlocal duplicates
        for event in events_in(message):
            if event.get_id() in seen:
                duplicates += 1
                continue
            seen.add(event.get_id())
            data = event.get_data()
            if isinstance(data, bytes):
                data = data.decode("utf-8", "replace")
            print(json.dumps({"id": event.get_id(), "subject": event.get_subject(),
                              "sequence": event.get_extension("sequence"), "data": data}), flush=True)

    v5 = args.protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(args.topic, qos=1)
    client.on_subscribe = lambda *_: print("subscribed", file=sys.stderr, flush=True)
    if v5:
        client.connect(args.host, args.port, properties=Properties(PacketTypes.CONNECT))
    else:
        client.connect(args.host, args.port)
    client.loop_start()
    started = time.monotonic()
    try:
        while not args.count or len(seen) < args.count:
            if args.timeout and time.monotonic() - started > args.timeout:
                print(f"timed out with {len(seen)} of {args.count} events", file=sys.stderr)
                return 1
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    print(f"{len(seen)} events, {duplicates} duplicates skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
