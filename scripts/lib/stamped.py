#!/usr/bin/python3
"""Stamped-block writer and checker for scripts/e2e-faults.sh (kill -9 scenario).

Every 4 KiB block this tool writes is *stamped*: bytes 0..8 hold the block number, 8..16 a
generation (a counter that only grows), and the rest is derived from both (SHA-256 repeated), so
a block read back is either all zeros (never written), a valid stamp of its own block number, or
garbage. The writer records, after each NBD flush that returned, the generation of every block
written before it (the *flushed* map, saved atomically to a JSON state file). The checker reads
the whole span and requires, for every block:

- a valid stamp of its own block number, or all zeros if no flushed write covers it;
- a generation at least the flushed one (an acknowledged flush must survive; a write issued
  after the last flush may or may not, so a newer generation is fine).

    stamped.py write URI STATE SPAN_BLOCKS SEED SECONDS   # until the server goes away or time is up
    stamped.py check URI STATE SPAN_BLOCKS                 # prints counts; exit 1 on any bad block

Bounded: the writer stops after SECONDS or at the first error; the checker reads SPAN_BLOCKS once.
"""

import hashlib
import json
import os
import random
import sys
import time

import nbd

BS = 4096


def stamp(lba: int, gen: int) -> bytes:
    head = lba.to_bytes(8, "little") + gen.to_bytes(8, "little")
    body = hashlib.sha256(head).digest() * ((BS - 16) // 32 + 1)
    return head + body[: BS - 16]


def load(state: str) -> dict:
    try:
        with open(state) as f:
            s = json.load(f)
        return {"gen": s["gen"], "flushed": {int(k): v for k, v in s["flushed"].items()}}
    except FileNotFoundError:
        return {"gen": 0, "flushed": {}}


def save(state: str, s: dict) -> None:
    tmp = state + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"gen": s["gen"], "flushed": s["flushed"]}, f)
    os.replace(tmp, state)


def write(uri: str, state: str, span: int, seed: int, seconds: float) -> int:
    s = load(state)
    rng = random.Random(seed)
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        print(f"writer: cannot connect: {e}", file=sys.stderr)
        return 0
    pending = {}
    writes = flushes = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            n = rng.randint(1, 16)
            first = rng.randrange(0, span - n + 1)
            s["gen"] += 1
            gen = s["gen"]
            data = b"".join(stamp(first + i, gen) for i in range(n))
            h.pwrite(data, first * BS)
            writes += 1
            for i in range(n):
                pending[first + i] = gen
            if rng.random() < 0.15:
                h.flush()
                flushes += 1
                s["flushed"].update(pending)
                pending = {}
                save(state, s)
    except nbd.Error:
        pass  # the server was killed: what was flushed is recorded
    # Generations handed out must never be reused, flushed or not.
    save(state, s)
    print(f"writer: {writes} writes, {flushes} flushes, generation {s['gen']}")
    return 0


def check(uri: str, state: str, span: int) -> int:
    s = load(state)
    h = nbd.NBD()
    h.connect_uri(uri)
    counts = {"blocks": 0, "zero": 0, "flushed_ok": 0, "newer": 0, "bad": 0}
    bad = []
    step = 256
    for first in range(0, span, step):
        n = min(step, span - first)
        buf = h.pread(n * BS, first * BS)
        for i in range(n):
            lba = first + i
            blk = buf[i * BS : (i + 1) * BS]
            want = s["flushed"].get(lba)
            counts["blocks"] += 1
            if blk == bytes(BS):
                if want is None:
                    counts["zero"] += 1
                else:
                    counts["bad"] += 1
                    bad.append(f"block {lba}: zeros, flushed generation {want} lost")
                continue
            got_lba = int.from_bytes(blk[0:8], "little")
            gen = int.from_bytes(blk[8:16], "little")
            if got_lba != lba or blk != stamp(lba, gen):
                counts["bad"] += 1
                bad.append(f"block {lba}: garbage (stamp says block {got_lba}, generation {gen})")
            elif want is not None and gen < want:
                counts["bad"] += 1
                bad.append(f"block {lba}: generation {gen}, older than the flushed {want}")
            elif want is not None and gen == want:
                counts["flushed_ok"] += 1
            else:
                counts["newer"] += 1
    print(
        "check: {blocks} blocks: {flushed_ok} at their flushed generation, {newer} newer "
        "(written after a flush), {zero} never written, {bad} bad".format(**counts)
    )
    for b in bad[:20]:
        print("  " + b, file=sys.stderr)
    return 1 if counts["bad"] else 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "write" and len(sys.argv) == 7:
        return write(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    if len(sys.argv) >= 2 and sys.argv[1] == "check" and len(sys.argv) == 5:
        return check(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
