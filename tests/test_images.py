"""Images: the open_clip encoder, image routes, safe fetching and decoding, the pipeline.

The model is a tiny open_clip config with seeded random weights (no CLIP weights
can be downloaded here): it has CLIP's architecture, not its knowledge, so the
routing test uses near-duplicates, which even random weights keep closest.
"""

from __future__ import annotations

import base64
import gc
import http.server
import io
import json
import random
import resource
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from sieve.encoders.clip import OpenClipEncoder, clip_encoder_id
from sieve.flow.images import ImageRejected, check_url, decode_image
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import RouteSetError, load_route_set
from sieve.settings import ImageFetchSettings, QdrantSettings
from sieve.store.qdrant import RouteStore
from sieve.topology import LimitsSpec, Topology

ROUTES = {"cats": "violating", "dogs": "clean", "boats": "boats", "trees": "trees"}


def picture(seed: int, size: int = 96) -> Image.Image:
    """A distinct generated picture: coloured rectangles on a coloured ground."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size - 16), rng.randrange(size - 16)
        draw.rectangle([x, y, x + rng.randrange(10, 40), y + rng.randrange(10, 40)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_route_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four routes of two example images each, plus prompts, next to their route file."""
    folder = tmp_path_factory.mktemp("image-routes")
    routes = []
    for r, (name, outcome) in enumerate(ROUTES.items()):
        paths = []
        for k in range(2):
            path = f"images/{name}-{k}.png"
            (folder / "images").mkdir(exist_ok=True)
            (folder / path).write_bytes(encoded(picture(10 * r + k)))
            paths.append(path)
        routes.append({"name": name, "outcome": outcome, "images": paths,
                       "prompts": [f"a photo of {name}"], "utterances": [f"something about {name}"]})
    route_set = {
        "name": "pictures", "default_outcome": "unrouted",
        # Near-duplicates under random weights: tight thresholds in the image space.
        "image_defaults": {"aggregation": {"method": "max"}, "accept": 0.998, "review": 0.99,
                           "margin": 0.0005},
        "routes": routes,
    }
    path = folder / "pictures.yaml"
    path.write_text(yaml.safe_dump(route_set, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def image_index(image_route_file: Path, tiny_clip: OpenClipEncoder) -> RouteIndex:
    return RouteIndex.build(load_route_set(image_route_file), tiny_clip, "image")


def topology_for(route_file: Path, tiny_clip_dir: Path, **limits) -> Topology:
    return Topology.model_validate({
        "name": "pictures",
        "input": {"topics": ["in"]},
        "route_set": {"name": "pictures", "file": str(route_file)},
        "image_encoder": {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None},
        "limits": limits,
        "output": {"outcome_topics": {"needs_review": "review"}, "outcome_topic_template": "out.{outcome}"},
    })


@pytest.fixture
def pipeline(image_route_file, image_index, tiny_clip, tiny_clip_dir, trivial_encoder) -> RouterPipeline:
    route_set = load_route_set(image_route_file)
    topology = topology_for(image_route_file, tiny_clip_dir, max_image_bytes=1_000_000,
                            max_image_pixels=4_000_000, max_image_frames=100)
    return RouterPipeline(topology, trivial_encoder, RouteIndex.build(route_set, trivial_encoder), "t",
                          image_encoder=tiny_clip, image_index=image_index,
                          image_fetch=ImageFetchSettings(timeout_s=2))


def image_record(offset: int, data: bytes | None = None, uri: str | None = None, event_id: str | None = None
                 ) -> RawRecord:
    event: dict = {"id": event_id or f"img-{offset}", "modality": "image"}
    if data is not None:
        event["image_b64"] = base64.b64encode(data).decode()
    else:
        event["image_uri"] = uri
    return RawRecord("in", 0, offset, None, json.dumps(event).encode(), time.time())


# -- the encoder -----------------------------------------------------------------------------


@settings(deadline=None, max_examples=10)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=6), st.integers(0, 5))
def test_image_rows_do_not_depend_on_batch_neighbours(tiny_clip, seeds, pick) -> None:
    images = [picture(s, size=40 + s % 50) for s in seeds]
    batch = tiny_clip.encode_images(images)
    i = pick % len(images)
    assert np.allclose(batch[i], tiny_clip.encode_images([images[i]])[0], atol=1e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


@settings(deadline=None, max_examples=10)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6), st.integers(0, 5))
def test_prompt_rows_do_not_depend_on_batch_neighbours(tiny_clip, prompts, pick) -> None:
    batch = tiny_clip.encode_prompts(prompts)
    i = pick % len(prompts)
    assert batch.shape == (len(prompts), tiny_clip.dim)
    assert np.allclose(batch[i], tiny_clip.encode_prompts([prompts[i]])[0], atol=1e-5)


def test_preprocessing_on_threads_is_the_same_tensor(tiny_clip) -> None:
    from PIL import Image

    images = [Image.new("RGB", (50 + 7 * i, 40 + 3 * i), (i * 20 % 255, 80, 160)) for i in range(9)]
    threads = tiny_clip.preprocess_threads
    try:
        tiny_clip.preprocess_threads = 1
        alone = tiny_clip.preprocess(images)
        tiny_clip.preprocess_threads = 4
        pooled = tiny_clip.preprocess(images)
    finally:
        tiny_clip.preprocess_threads = threads
    assert tiny_clip._preprocessors is not None  # the pool ran
    assert alone.shape[0] == 9 and bool((alone == pooled).all())


def test_saved_tiny_model_reloads_identically(tiny_clip, tiny_clip_dir) -> None:
    again = OpenClipEncoder(f"local-dir:{tiny_clip_dir}", None, device="cpu")
    images = [picture(1), picture(2)]
    assert again.id == tiny_clip.id and again.id.startswith("clip:")
    # what a worker with a compute child loads the image index by, without the model
    assert clip_encoder_id(f"local-dir:{tiny_clip_dir}", None) == tiny_clip.id
    assert clip_encoder_id("ViT-B-32", "laion2b_s34b_b79k") == "clip:ViT-B-32:laion2b_s34b_b79k"
    assert np.array_equal(again.encode_images(images), tiny_clip.encode_images(images))


# -- routes with images ----------------------------------------------------------------------


def test_image_examples_are_part_of_the_version(image_route_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pictures.yaml"
    copy.write_text(image_route_file.read_text())
    (tmp_path / "images").mkdir()
    for source in (image_route_file.parent / "images").iterdir():
        (tmp_path / "images" / source.name).write_bytes(source.read_bytes())
    before = load_route_set(copy).version
    assert before == load_route_set(image_route_file).version
    (tmp_path / "images" / "cats-0.png").write_bytes(encoded(picture(999)))
    assert load_route_set(copy).version != before
    (tmp_path / "images" / "cats-0.png").unlink()
    with pytest.raises(RouteSetError, match=r"route 'cats' \(routes\[0\]\), field 'images'.*cats-0.png"):
        load_route_set(copy)


def test_image_space_sync_and_load(image_route_file, tiny_clip, image_index, tmp_path) -> None:
    store = RouteStore(QdrantSettings(path=tmp_path / "q"))
    route_set = load_route_set(image_route_file)
    report = store.sync(route_set, tiny_clip)
    assert (report.added, report.deleted) == (12, 0)  # 8 images + 4 prompts
    assert store.sync(route_set, tiny_clip).added == 0
    loaded = store.load("pictures", tiny_clip.id)
    assert loaded.space == "image" and loaded.example_ids == image_index.example_ids
    assert np.allclose(loaded.vectors, image_index.vectors, atol=1e-5)


def test_near_duplicates_route_to_their_examples_route(pipeline: RouterPipeline) -> None:
    records = []
    expected = {}
    for r, name in enumerate(ROUTES):
        for k in range(2):
            variant = picture(10 * r + k).resize((80, 80))
            records.append(image_record(len(records), encoded(variant, "JPEG", quality=70)))
            expected[f"img-{len(records) - 1}"] = (name, f"images/{name}-{k}.png")
    result = pipeline.process(records)
    assert result.dead_letters == []
    assert len(result.decisions) == len(records)
    for decision in result.decisions:
        route, example = expected[decision.event_id]
        assert decision.modality == "image"
        assert decision.nearest[0].text == example
        assert decision.route == route and decision.outcome == ROUTES[route], decision
        assert decision.image is not None and decision.image.format == "JPEG"
        assert decision.image.width == 80 and decision.event.image_uri is None
        assert "image_b64" not in decision.model_dump_json()  # the pixels stay out of decisions


def test_text_and_image_events_in_one_batch(pipeline: RouterPipeline) -> None:
    text = RawRecord("in", 0, 50, None, json.dumps({"id": "t-1", "text": "something about boats"}).encode(),
                     time.time())
    result = pipeline.process([text, image_record(51, encoded(picture(20)))])
    by_id = {d.event_id: d for d in result.decisions}
    assert by_id["t-1"].modality == "text" and by_id["t-1"].encoder.startswith("trivial")
    assert by_id["img-51"].modality == "image" and by_id["img-51"].encoder.startswith("clip:")
    assert by_id["img-51"].route == "boats"


# -- bad input -------------------------------------------------------------------------------


def gif_with_frames(count: int) -> bytes:
    frames = []
    for i in range(count):  # each frame differs, or Pillow merges duplicates
        frame = Image.new("L", (16, 16), 0)
        frame.putpixel((i % 16, (i // 16) % 16), 255)
        frames.append(frame)
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def big_canvas_gif() -> bytes:
    """A GIF whose logical screen is 20,000 x 20,000 while its data is tiny."""
    data = bytearray(encoded(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = (20000).to_bytes(2, "little") * 2  # logical screen width, height
    data[-6 - 4:-6] = (20000).to_bytes(2, "little") * 2  # image descriptor width, height (best effort)
    return bytes(data)


def bomb_png() -> bytes:
    """20,000 x 20,000 one-bit pixels: 400 Mpx decoded, a few hundred kB encoded."""
    return encoded(Image.new("1", (20000, 20000)), "PNG", optimize=True)


def test_bad_images_are_dead_letters_with_reasons_and_memory_stays_bounded(pipeline) -> None:
    truncated = encoded(picture(3))[:-200]
    records = [
        image_record(0, bomb_png()),
        image_record(1, truncated),
        image_record(2, gif_with_frames(150)),
        image_record(3, b"%PDF-1.7 definitely not an image"),
        image_record(4, uri="http://127.0.0.1:9/cat.png"),
        image_record(5, uri="http://169.254.169.254/latest/meta-data/"),
        image_record(6, uri="file:///etc/passwd"),
        image_record(7, encoded(picture(4))),  # a good one among them: the batch goes on
        RawRecord("in", 0, 8, None, json.dumps({"id": "x", "modality": "image", "image_b64": "@@@"}).encode(),
                  None),
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = pipeline.process(records)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    reasons = {letter.offset: letter.reason for letter in result.dead_letters}
    assert reasons == {0: "image_pixels", 1: "image_corrupt", 2: "image_frames", 3: "image_format",
                       4: "image_uri_refused", 5: "image_uri_refused", 6: "image_uri_refused",
                       8: "image_base64"}
    assert [d.event_id for d in result.decisions] == ["img-7"]
    assert all(letter.payload_b64 for letter in result.dead_letters)  # original bytes kept
    assert grown_mib < 200, f"decoding grew the process by {grown_mib:.0f} MiB"


def test_huge_logical_screen_gif_is_refused_by_pixels() -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(big_canvas_gif(), LimitsSpec(max_image_pixels=4_000_000))
    assert info.value.reason in {"image_pixels", "image_corrupt"}


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    loaded = decode_image(encoded(image, "JPEG", exif=exif.tobytes()), LimitsSpec())
    assert (loaded.image.width, loaded.image.height) == (20, 40)
    assert loaded.image.mode == "RGB"


def test_format_allow_list() -> None:
    with pytest.raises(ImageRejected, match="TIFF") as info:
        decode_image(encoded(picture(1), "TIFF"), LimitsSpec())
    assert info.value.reason == "image_format"


@pytest.mark.parametrize("url", ["http://localhost/x.png", "http://10.0.0.8/x.png", "http://[::1]/x.png",
                                 "http://169.254.169.254/", "ftp://example.com/x.png", "http:///x.png"])
def test_ssrf_refusals(url: str) -> None:
    with pytest.raises(ImageRejected) as info:
        check_url(url, ImageFetchSettings())
    assert info.value.reason == "image_uri_refused"


def test_allow_listed_network_passes() -> None:
    addresses = check_url("http://127.0.0.1:8080/x.png", ImageFetchSettings(allow_hosts=("127.0.0.0/8",)))
    assert addresses == ["127.0.0.1"]  # the addresses a fetch may connect to


class _ImageServer(http.server.BaseHTTPRequestHandler):
    """Serves a small PNG, an oversized body with and without Content-Length, and a redirect."""

    small = b""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/small.png":
            self._send(self.small, length=True)
        elif self.path == "/big-declared":
            self._send(b"\0" * 3_000_000, length=True)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(300):
                chunk = b"\0" * 10_000
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/")
            self.end_headers()
        else:
            self._send(b"", length=True, status=404)

    def _send(self, body: bytes, length: bool, status: int = 200) -> None:
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    _ImageServer.small = encoded(picture(30))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_limits_against_a_loopback_server(pipeline, image_server: str) -> None:
    # Loopback is refused by default; this test allow-lists it to reach its own server.
    pipeline.image_fetch = ImageFetchSettings(allow_hosts=("127.0.0.1",), timeout_s=3)
    records = [image_record(0, uri=f"{image_server}/small.png"),
               image_record(1, uri=f"{image_server}/big-declared"),
               image_record(2, uri=f"{image_server}/big-chunked"),
               image_record(3, uri=f"{image_server}/to-metadata"),
               image_record(4, uri=f"{image_server}/missing.png")]
    result = pipeline.process(records)
    assert {letter.offset: letter.reason for letter in result.dead_letters} == {
        1: "image_too_large", 2: "image_too_large", 3: "image_uri_refused", 4: "image_fetch_failed"}
    [decision] = result.decisions
    assert decision.image is not None and decision.image.uri == f"{image_server}/small.png"
    assert decision.event.image_uri == f"{image_server}/small.png"


def test_file_uris_only_inside_the_configured_root(pipeline, tmp_path: Path) -> None:
    inside = tmp_path / "inbox" / "a.png"
    inside.parent.mkdir()
    inside.write_bytes(encoded(picture(5)))
    outside = tmp_path / "b.png"
    outside.write_bytes(encoded(picture(6)))
    pipeline.image_fetch = ImageFetchSettings(file_root=inside.parent)
    result = pipeline.process([image_record(0, uri=inside.as_uri()), image_record(1, uri=outside.as_uri()),
                               image_record(2, uri=(inside.parent / ".." / "b.png").as_uri())])
    assert [d.event_id for d in result.decisions] == ["img-0"]
    assert {letter.offset: letter.reason for letter in result.dead_letters} == {
        1: "image_uri_refused", 2: "image_uri_refused"}


# -- end to end through the dev broker -------------------------------------------------------


@pytest.mark.integration
def test_mixed_text_and_image_stream_each_decided_once(dev_broker, image_route_file, tiny_clip_dir,
                                                       tmp_path) -> None:
    import asyncio
    import subprocess
    import sys

    from sieve.kafka.client import produce
    from sieve.settings import KafkaSettings

    from .conftest import worker_env
    from .test_integration import read_all

    prefix = "mixed"
    topology = {
        "name": "mixed", "group_id": "mixed-group",
        "input": {"topics": [f"{prefix}.text", f"{prefix}.images"], "partitions": 2},
        "route_set": {"name": "pictures", "file": str(image_route_file)},
        "encoder": {"kind": "trivial"},
        "image_encoder": {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None, "batch_size": 16},
        "batching": {"max_events": 64, "max_wait_s": 0.1},
        "output": {"outcome_topics": {"needs_review": f"{prefix}.needs-review"},
                   "outcome_topic_template": prefix + ".{outcome}", "route_topic_prefix": None,
                   "dead_letter_topic": f"{prefix}.dead-letter"},
    }
    topology_path = tmp_path / "mixed.yaml"
    topology_path.write_text(yaml.safe_dump(topology))
    env = worker_env(dev_broker, tmp_path / "qdrant")
    sync = subprocess.run([sys.executable, "-m", "sieve", "routes", "sync", str(image_route_file),
                           "--topology", str(topology_path)], env=env, capture_output=True, text=True)
    assert sync.returncode == 0, sync.stderr
    assert sync.stderr.count("synced pictures") == 2  # the text space and the CLIP space
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "sieve", "worker", str(topology_path)], env=env,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        kafka = KafkaSettings(bootstrap_servers=dev_broker)
        texts = [(f"t{i}".encode(), json.dumps({"id": f"t{i}", "text": f"something about {name}"}).encode())
                 for i, name in enumerate(list(ROUTES) * 25)]
        images = []
        for i in range(100):
            data = encoded(picture(10 * (i % 4) + i % 2).resize((64 + i % 30, 64)), "JPEG", quality=80)
            event = {"id": f"i{i}", "modality": "image", "image_b64": base64.b64encode(data).decode()}
            images.append((event["id"].encode(), json.dumps(event).encode()))
        images.append((b"bad", json.dumps({"id": "bad", "modality": "image",
                                           "image_b64": base64.b64encode(b"nope").decode()}).encode()))
        asyncio.run(produce(kafka, f"{prefix}.text", texts))
        asyncio.run(produce(kafka, f"{prefix}.images", images))
        names = ("violating", "clean", "boats", "trees", "unrouted", "needs-review")
        outcomes = {f"{prefix}.{o}" for o in names}
        wanted = {f"t{i}" for i in range(100)} | {f"i{i}" for i in range(100)}
        decisions = asyncio.run(read_all(kafka, sorted(outcomes), until=wanted, timeout_s=180))
        assert worker.poll() is None, log.read_text()[-3000:]
        counts: dict[str, int] = {}
        for d in decisions:
            counts[d["event_id"]] = counts.get(d["event_id"], 0) + 1
        assert set(counts) == wanted and set(counts.values()) == {1}, log.read_text()[-3000:]
        for d in decisions:
            assert d["modality"] == ("image" if d["event_id"].startswith("i") else "text")
            if d["modality"] == "image":
                assert d["image"]["format"] == "JPEG" and d["encoder"].startswith("clip:")
                assert d["route"] == list(ROUTES)[int(d["event_id"][1:]) % 4]
        letters = asyncio.run(read_all(kafka, [f"{prefix}.dead-letter"], until={"bad"}, timeout_s=30))
        assert [(x["event_id"], x["reason"]) for x in letters] == [("bad", "image_format")]
    finally:
        worker.kill()
        worker.wait(10)


def test_shipped_multimodal_topology_and_route_set_are_consistent() -> None:
    from sieve.topology import load_topology, load_topology_route_set

    topology = load_topology(Path(__file__).resolve().parents[1] / "topologies" / "marketplace.yaml")
    route_set = load_topology_route_set(topology)
    assert topology.modalities == {"text", "image"}
    assert topology.image_encoder is not None and topology.image_encoder.model == "ViT-B-32"
    assert {r.name for r in route_set.routes_in("image")} == {r.name for r in route_set.routes}
    assert {r.name for r in route_set.routes_in("text")} == {r.name for r in route_set.routes}
    image_accept = [route_set.thresholds_for(r, space="image").accept for r in route_set.routes]
    text_accept = [route_set.thresholds_for(r, space="text").accept for r in route_set.routes]
    assert max(image_accept) < min(text_accept)  # CLIP's scale is not MiniLM's


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_batch_that_loaded_images_frees_the_cycles_it_left_and_a_text_batch_waits(pipeline) -> None:
    """Failed fetches leave frames and tasks in cycles; the compute stage collects after image batches."""
    from sieve.worker.compute import run_pipeline

    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(1_000_000)  # as the worker runs (settle_heap): no collection by itself here
    try:
        node = _Node()
        alive = weakref.ref(node)
        del node
        text = RawRecord("in", 0, 0, b"k", json.dumps({"id": "t", "text": "hello"}).encode(), time.time())
        run_pipeline(pipeline, [text])
        assert alive() is not None  # a text batch does not pay for a collection
        run_pipeline(pipeline, [image_record(1, uri="http://127.0.0.1:9/refused.png")])
        assert alive() is None
    finally:
        gc.set_threshold(*thresholds)
