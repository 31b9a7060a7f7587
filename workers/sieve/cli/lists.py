"""``sieve lists ...``: check list files, turn a word file into a term list, hash known images."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import console, fail

app = typer.Typer(help="Term, pattern and image hash lists (files beside a route set).",
                  no_args_is_help=True)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@app.command("check")
def lists_check(files: Annotated[list[Path], typer.Argument(help="List files (YAML or JSON).")]) -> None:
    """Load each list as a worker would; name the file, entry and field of the first problem."""
    from sieve.lists import ListError, load_list

    for path in files:
        try:
            loaded = load_list(path)
        except ListError as exc:
            fail(str(exc))
        action = getattr(loaded, "action", None)
        target = f" -> route {loaded.route}" + (f" ({action})" if action else "") if loaded.route else ""
        console.print(f"{path}: {loaded.kind} list {loaded.name!r}, {len(loaded.entries)} entries{target}")


@app.command("from-words")
def lists_from_words(
    words: Annotated[Path, typer.Argument(help="A text file: one term a line; blank lines and # comments "
                                                "are skipped.")],
    out: Annotated[Path, typer.Option("--out", help="The term list to write.")],
    route: Annotated[str, typer.Option(help="The route a hit adds.")],
    action: Annotated[str, typer.Option(help="accept (a hit accepts the route) or review (a hit holds it "
                                             "for review).")] = "accept",
    name: Annotated[str | None, typer.Option(help="The list's name (default: the file's stem).")] = None,
    description: Annotated[str | None, typer.Option(help="Where the words come from, their licence.")] = None,
) -> None:
    """Write a block list with one term entry per line of WORDS (ids ``w0001``, ... in file order)."""
    import yaml

    from sieve.lists import ListError, parse_list

    try:
        lines = words.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        fail(f"{words}: cannot read: {exc.strerror or exc}")
    terms = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    data: dict = {"schema_version": 2, "name": name or out.stem, "kind": "block", "route": route,
                  "action": action}
    if description:
        data["description"] = description
    data["entries"] = [{"id": f"w{i:04d}", "term": term} for i, term in enumerate(terms, 1)]
    try:
        parse_list(data, str(out))
    except ListError as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True), encoding="utf-8")
    console.print(f"{out}: {len(terms)} terms -> route {route} ({action})")


@app.command("add-images")
def lists_add_images(
    directory: Annotated[Path, typer.Argument(help="A folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="The hash list to write or extend.")],
    route: Annotated[str | None, typer.Option(help="The route a match adds (a new list needs it).")] = None,
    name: Annotated[str | None, typer.Option(help="The list's name (a new list: the file's stem).")] = None,
    max_distance: Annotated[int, typer.Option(help="Hamming distance at which a hash matches.")] = 8,
) -> None:
    """Hash every image under DIRECTORY into a hash list; the images themselves are not stored.

    Each entry's id is ``img-`` and the first 16 hex digits of the file's SHA-256 (the same file
    added twice is one entry); the hashes of its crops (up to 5% per side) go with it.
    """
    import yaml
    from PIL import Image, UnidentifiedImageError

    from sieve.flow.image_hashes import crop_hashes, phash_hex
    from sieve.lists import HashList, ListError, load_list, parse_list

    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    data: dict
    if out.exists():
        try:
            existing = load_list(out)
        except ListError as exc:
            fail(str(exc))
        if not isinstance(existing, HashList):
            fail(f"{out}: a {existing.kind} list, not an image hash list")
        data = existing.model_dump(mode="json", exclude_none=True)
    else:
        if route is None:
            fail("a new hash list needs --route (the route a match adds)")
        data = {"schema_version": 1, "name": name or out.stem, "kind": "image_hash", "route": route,
                "algorithm": "phash", "max_distance": max_distance, "entries": []}
    known = {entry["id"] for entry in data["entries"]}
    added = skipped = 0
    for path in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        entry_id = "img-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if entry_id in known:
            continue
        try:
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            console.print(f"skipped {path}: {exc}")
            skipped += 1
            continue
        data["entries"].append({"id": entry_id, "hash": phash_hex(rgb), "crops": crop_hashes(rgb),
                                "note": path.name})
        known.add(entry_id)
        added += 1
    if not data["entries"]:
        fail(f"{directory}: no image to hash")
    try:
        parse_list(data, str(out))
    except ListError as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False, width=120), encoding="utf-8")
    console.print(f"{out}: {added} images added, {skipped} skipped, {len(data['entries'])} entries")
