"""Tenants and image events: a tenant's set's image index when it has one, else the topology's.

The tiny open_clip model (seeded random weights) and the image route set of tests/test_images.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import load_route_set, parse_route_set
from sieve.settings import ImageFetchSettings
from sieve.topology import Topology

from .test_images import ROUTES, encoded, image_index, image_record, image_route_file, picture  # noqa: F401


def test_image_events_use_their_tenants_image_index_or_the_topologys(  # noqa: F811
    image_route_file: Path, image_index: RouteIndex, tiny_clip, tiny_clip_dir: Path, trivial_encoder,  # noqa: F811
) -> None:
    own = load_route_set(image_route_file)
    copy = own.model_copy(update={"name": "pictures2"})  # the same images: its own image index
    text_only = parse_route_set({"name": "kidtext", "default_outcome": "unrouted", "routes": [
        {"name": "boats", "outcome": ROUTES["boats"], "utterances": ["something about boats"]}]})
    topology = Topology.model_validate({
        "name": "pictures", "input": {"topics": ["in"]},
        "route_set": {"name": "pictures", "file": str(image_route_file)},
        "image_encoder": {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None},
        "output": {"outcome_topics": {"needs_review": "review"}, "outcome_topic_template": "out.{outcome}"},
        "tenants": {"policies": {"kids": {"route_set": {"name": "kidtext"}},
                                 "pros": {"route_set": {"name": "pictures2"}}}},
    })
    pipeline = RouterPipeline(
        topology, trivial_encoder, RouteIndex.build(own, trivial_encoder), "t",
        image_encoder=tiny_clip, image_index=image_index, image_fetch=ImageFetchSettings(timeout_s=2),
        tenant_indexes={("kidtext", "text"): RouteIndex.build(text_only, trivial_encoder),
                        ("pictures2", "text"): RouteIndex.build(copy, trivial_encoder),
                        ("pictures2", "image"): RouteIndex.build(copy, tiny_clip, "image")})
    records = []
    for tenant in ("kids", "pros", None):
        for modality in ("text", "image"):
            event_id = f"{tenant}-{modality}"
            if modality == "image":
                record = image_record(len(records), encoded(picture(20)), event_id=event_id)
                event = json.loads(record.value)
            else:
                event = {"id": event_id, "text": "something about boats"}
            if tenant is not None:
                event["tenant"] = tenant
            records.append(RawRecord("in", 0, len(records), None, json.dumps(event).encode(), time.time()))
    result = pipeline.process(records)
    assert result.dead_letters == []
    sets = {d.event_id: d.route_set for d in result.decisions}
    assert sets == {"kids-text": "kidtext", "kids-image": "pictures",  # no image index: the topology's
                    "pros-text": "pictures2", "pros-image": "pictures2", "None-text": "pictures",
                    "None-image": "pictures"}
    # a new version of the topology's image index reaches the tenants that fall back to it
    newer = RouteIndex.build(own.model_copy(update={"description": "v2"}), tiny_clip, "image")
    pipeline.swap_index(newer)
    assert pipeline.tenant_indexes[("pictures", "image")] is newer
    assert pipeline.tenant_indexes[("pictures2", "image")].route_set.name == "pictures2"
    kids_image = pipeline.process([records[1]]).decisions[0]
    assert (kids_image.route_set, kids_image.route_set_version) == ("pictures", newer.version)
