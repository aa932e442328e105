"""What a recipe output records about how it was made, and what a rerun decides from it.

An output carries its canonical entry, the entry's SHA-256 and a fingerprint of each input (size
and SHA-256 of its safetensors header). A rerun skips an output whose entry hash and input
fingerprints match and which is newer than every input (an input rewritten in place with the
same header is caught by its mtime, as `make` would). Anything else at an output path is the
user's file: refused without --force. Pins are checked by hashing, before any output is opened.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass

from lorabake.errors import HeaderError, InputError, OutputError
from lorabake.jobs import INPUTS_KEY, RECIPE_HASH_KEY, RECIPE_KEY, Job, Pin
from lorabake.quant.gguf_file import is_gguf, open_gguf
from lorabake.st_header import read_header
from lorabake.st_writer import TMP_MARKER

HASH_CHUNK = 8 << 20


def input_files(path: str) -> list[str]:
    """The safetensors files that make up an input (one, or a folder's/index's shards)."""
    if os.path.isfile(path) and not path.endswith(".index.json"):
        return [path]
    from lorabake.st_reader import SafetensorsReader  # folders and indexes: the reader knows the layouts

    with SafetensorsReader(path) as reader:
        return reader.files()


def fingerprint(job: Job) -> list[dict]:
    """Header-only identity of every input of `job`, in job order (recorded in the output)."""
    out = []
    for use in job.inputs:
        for path in input_files(use.resolved):
            header = read_header(path)
            name = use.text if path == use.resolved else os.path.join(use.text, os.path.relpath(path, use.resolved))
            out.append({"file": name, "size": header.file_size, "header_sha256": header.header_sha256})
    return out


def output_metadata(job: Job, prints: list[dict]) -> tuple[tuple[str, str], ...]:
    return (
        (RECIPE_KEY, json.dumps(job.entry(), separators=(",", ":"), ensure_ascii=False)),  # in reading order
        (RECIPE_HASH_KEY, job.entry_sha256),
        (INPUTS_KEY, json.dumps(prints, separators=(",", ":"), ensure_ascii=False)),
    )


@dataclass(frozen=True)
class Existing:
    """What is already at a job's output path: `state` is "absent", "done" or "other" (why)."""

    state: str
    reason: str = ""


def _output_metadata(path: str) -> dict[str, str]:
    if not is_gguf(path):
        return read_header(path).metadata
    base = open_gguf(path)
    base.close()
    return base.metadata


def existing_output(job: Job, prints: list[dict]) -> Existing:
    path = job.output_path
    if not os.path.exists(path):
        return Existing("absent")
    try:
        meta = _output_metadata(path)
    except (HeaderError, OSError):
        return Existing("other", "it is not a readable safetensors or GGUF file")
    if meta.get(RECIPE_HASH_KEY) is None:
        return Existing("other", "it was not made by a recipe")
    if meta.get(RECIPE_HASH_KEY) != job.entry_sha256:
        return Existing("other", "it was made by a different recipe entry")
    try:
        recorded = json.loads(meta.get(INPUTS_KEY, "null"))
    except (ValueError, RecursionError):
        recorded = None
    if recorded != prints:
        return Existing("other", "its inputs have changed since")
    made = os.stat(path).st_mtime_ns
    for use in job.inputs:
        for f in input_files(use.resolved):
            if os.stat(f).st_mtime_ns > made:
                return Existing("other", f"{use.text} was modified after it was made")
    return Existing("done", "made from the same entry and inputs")


def verify_pins(pins: list[Pin]) -> None:
    """Hash each pinned file; the first mismatch stops the batch before any output is written."""
    for pin in pins:
        if not os.path.isfile(pin.resolved):
            raise InputError("a pinned input is missing or not a single file", path=pin.resolved,
                             hint="pins name single .safetensors files")
        actual = file_sha256(pin.resolved, data_only=pin.kind == "data_sha256")
        if actual != pin.sha256:
            what = "data-section SHA-256" if pin.kind == "data_sha256" else "SHA-256"
            raise InputError(f"{what} is {actual}, the recipe pins {pin.sha256}", path=pin.resolved,
                             hint="the file is not the one the recipe was written for; fix the file or the pin")


def file_sha256(path: str, *, data_only: bool) -> str:
    start = read_header(path).data_offset if data_only else 0
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def remove_stale_temps(target: str) -> list[str]:
    """Delete temporary files a killed run left beside `target` (their process is gone)."""
    folder, name = os.path.split(os.path.abspath(target))
    prefix = f".{name}{TMP_MARKER}"
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.listdir(folder):
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix):]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _alive(int(pid_text)):
            continue  # another live process is writing it
        os.remove(os.path.join(folder, entry))
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def refuse_existing(job: Job, existing: Existing) -> OutputError:
    return OutputError(f"output exists and {existing.reason} ({job.where})", path=job.output_path,
                       hint="pass --force to overwrite it, or change the output name")
