"""Checking a run directory's committed files before a resume trusts them.

A crash cannot leave a half-written file under a final name (everything is written to a temporary name
and renamed), but a disk, a copy or a person can: a truncated or corrupted checkpoint, a `state.json`
that does not parse or names a round whose files are gone, a torn `metrics.jsonl` line, a pairs file cut
short. Each check below returns what is wrong, in words naming the file, or None when the file is intact.

    checkpoints/round_<k>/checksums.json   every file of the checkpoint with its size and SHA-256,
                                           written last inside the temporary directory before the rename
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from actors.settings import ADAPTER_DIR

CHECKSUMS_FILE = "checksums.json"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def checksums(files: dict[str, bytes]) -> dict[str, dict]:
    """checksums.json's content for `files` (relative path -> the bytes written there)."""
    return {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in sorted(files.items())}


def checkpoint_problem(folder: str) -> str | None:
    """What is wrong with the checkpoint in `folder`, or None. With its checksums file every listed file
    (weights, config, tokenizer, AdamW state) must be there with its size and SHA-256; a checkpoint written
    before odpo wrote checksums gets the structural checks only (config.json parses, every safetensors
    file's header parses and its data ends where the file does)."""
    if not os.path.isdir(folder):
        return f"{folder} is missing"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return f"{os.path.join(folder, 'config.json')} is missing"
    # the whole policy, or a LoRA run's adapters alone (learner.lora.sync=adapter without save_merged)
    weights = [rel for rel in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors")
               if os.path.isfile(os.path.join(folder, rel))]
    if not weights:
        return f"{os.path.join(folder, 'model.safetensors')} is missing"
    needed = ["config.json", *weights]
    listed_path = os.path.join(folder, CHECKSUMS_FILE)
    if os.path.exists(listed_path):
        try:
            with open(listed_path) as f:
                listed = json.load(f)
            sizes = {rel: (int(v["bytes"]), str(v["sha256"])) for rel, v in listed.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return f"{listed_path} does not parse ({type(e).__name__}: {e})"
        for rel, (size, digest) in sizes.items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{path} is missing (listed in {CHECKSUMS_FILE})"
            if os.path.getsize(path) != size:
                return f"{path} has {os.path.getsize(path)} bytes, {size} were written (truncated or replaced)"
            if sha256_of(path) != digest:
                return f"{path} does not match its SHA-256 in {CHECKSUMS_FILE} (corrupted)"
        unlisted = [rel for rel in needed if rel not in sizes]
        if unlisted:
            return f"{os.path.join(folder, unlisted[0])} is not in {CHECKSUMS_FILE} (written by another run?)"
        return None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            json.load(f)
    except ValueError as e:
        return f"{os.path.join(folder, 'config.json')} does not parse ({e})"
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors") and (problem := safetensors_problem(os.path.join(root, name))):
                return problem
    return None


def safetensors_problem(path: str) -> str | None:
    """The safetensors layout, checked without loading: 8-byte header length, a JSON header, tensors whose
    data offsets lie inside the file and end exactly at its end."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{path} is truncated (its header alone needs {8 + n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return f"{path}: its header does not parse ({type(e).__name__})"
    if 8 + n + max(ends, default=0) != size:
        return f"{path} is truncated or padded: its tensors end at byte {8 + n + max(ends, default=0)}, the file at {size}"
    return None


def jsonl_problem(path: str, expected_lines: int | None = None, skip_first: bool = False) -> str | None:
    """A JSON-lines file written whole: every line a JSON object, the last one ended, and, when known, as
    many lines as the round's metrics say (`expected_lines`; `skip_first`: a header line not counted)."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        return f"{path} ends in the middle of a line (cut short)"
    lines = _lines(data)
    for i, line in enumerate(lines, 1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return f"{path}: line {i} does not parse ({e})"
    counted = len(lines) - (1 if skip_first else 0)
    if expected_lines is not None and counted != expected_lines:
        return f"{path} has {counted} pairs, the round's metrics say {expected_lines}"
    return None


def metrics_lines(path: str) -> tuple[dict[int, dict], list[str]]:
    """metrics.jsonl's rounds (round -> its line) and what is wrong with the lines that do not parse."""
    rounds, problems = {}, []
    if not os.path.exists(path):
        return rounds, [f"{path} is missing"]
    with open(path, "rb") as f:
        lines = _lines(f.read())
    for i, line in enumerate(lines, 1):
        try:
            m = json.loads(line)
            rounds[int(m["round"])] = m
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{path}: line {i} does not parse ({type(e).__name__}: {str(e)[:80]})")
    return rounds, problems


def _lines(data: bytes) -> list[str]:
    """JSON lines split at "\\n" only: a response's text may hold U+2028, U+0085 or \\x1c, which
    str.splitlines() also splits at (json.dumps(ensure_ascii=False) leaves them raw)."""
    return [line.decode("utf-8", errors="replace") for line in data.split(b"\n") if line]
