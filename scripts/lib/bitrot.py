#!/usr/bin/python3
"""Bit rot for scripts/e2e-faults.sh (scenario d): flips bits in the chunk slots of disk files,
checks what a scrub reported against what was flipped, and reads a volume block by block.

A volume's chunk slots start at `slots_start` on every disk (docs/write-path.md, region layout:
`region_offset + journal_size`); slot `s` is `slot_size = chunk_size + meta_pages * 4 KiB`
bytes: the chunk's 4 KiB blocks (row `r` at `r * 4096`), then the 64-byte metadata entries
(row `r` at `chunk_size + r * 64`). A data chunk's entry holds the block's logical address at
bytes 16..24, so the entry tells data rows from parity rows (a parity entry is Reed-Solomon
parity of the data entries, and never decodes to an address of its own stripe and row).

    bitrot.py rot GEOMETRY DISKS STRIPES COUNT MAX_DISKS SEED OUT
        flip 1-3 bits in each of COUNT distinct shards (stripe, disk, row) of the first STRIPES
        stripes, in the row's block or in its metadata entry, at most MAX_DISKS disks per
        stripe; prints the counts, writes the shards to OUT (JSON)
    bitrot.py rot-rows GEOMETRY DISKS STRIPES ROWS SEED OUT
        flip bits in the block of one random row in each of ROWS random stripes, on every disk
        of DISKS; OUT lists the shards and the logical blocks that lost their data (`lost`)
    bitrot.py match-scrub SHARDS SCRUB_JSON
        every flipped shard is in the scrub's list of bad shards, repaired, and nothing else is
    bitrot.py read URI REFERENCE SHARDS
        read the whole volume (1 MiB requests; 4 KiB ones where a request fails): every block
        reads as REFERENCE (zero-padded) or fails with an error, and exactly the blocks listed as
        `lost` in SHARDS fail

GEOMETRY is `slots_start,slot_size,chunk_size,k`; DISKS is `id=path,id=path,...`.
Bounded: every loop runs over a fixed list of shards or blocks.
"""

import json
import random
import sys

BS = 4096


def geometry(arg: str) -> dict:
    start, slot, chunk, k = (int(x) for x in arg.split(","))
    return {"start": start, "slot": slot, "chunk": chunk, "k": k, "bpc": chunk // BS}


def disks(arg: str) -> dict:
    out = {}
    for item in arg.split(","):
        i, path = item.split("=", 1)
        out[int(i)] = path
    return out


def flip(path: str, offset: int, length: int, rng: random.Random) -> int:
    """Flips 1-3 distinct bits in [offset, offset + length) of the file; returns how many."""
    n = rng.randint(1, 3)
    bits = rng.sample(range(length * 8), n)
    with open(path, "r+b") as f:
        for b in bits:
            f.seek(offset + b // 8)
            byte = f.read(1)[0]
            f.seek(offset + b // 8)
            f.write(bytes([byte ^ (1 << (b % 8))]))
    return n


def entry_lba(g: dict, path: str, stripe: int, row: int):
    """The logical block that (stripe, row) of this disk holds, or None for a parity row."""
    with open(path, "rb") as f:
        f.seek(g["start"] + stripe * g["slot"] + g["chunk"] + row * 64)
        meta = f.read(64)
    lba = int.from_bytes(meta[16:24], "little")
    bps = g["k"] * g["bpc"]
    if len(meta) == 64 and lba // bps == stripe and lba % g["bpc"] == row:
        return lba
    return None


def rot(g, dk, stripes, count, max_disks, seed, out) -> int:
    rng = random.Random(seed)
    ids = sorted(dk)
    per_stripe = {}
    shards = []
    bits = in_block = in_meta = data_rows = 0
    tries = 0
    while len(shards) < count and tries < count * 100:
        tries += 1
        s = rng.randrange(stripes)
        chosen = per_stripe.setdefault(s, rng.sample(ids, rng.randint(1, max_disks)))
        d = rng.choice(chosen)
        r = rng.randrange(g["bpc"])
        if any(x["stripe"] == s and x["disk"] == d and x["row"] == r for x in shards):
            continue
        lba = entry_lba(g, dk[d], s, r)
        slot = g["start"] + s * g["slot"]
        if rng.random() < 0.75:
            bits += flip(dk[d], slot + r * BS, BS, rng)
            in_block += 1
        else:
            bits += flip(dk[d], slot + g["chunk"] + r * 64, 64, rng)
            in_meta += 1
        data_rows += lba is not None
        shards.append({"stripe": s, "disk": d, "row": r, "lba": lba})
    with open(out, "w") as f:
        json.dump({"shards": shards, "lost": []}, f)
    print(
        f"flipped {bits} bits in {len(shards)} shards of {len(per_stripe)} stripes "
        f"({data_rows} data blocks, {len(shards) - data_rows} parity rows; {in_block} in the "
        f"block, {in_meta} in the metadata entry), at most {max_disks} disks per stripe"
    )
    return 0 if len(shards) == count else 1


def rot_rows(g, dk, stripes, rows, seed, out) -> int:
    rng = random.Random(seed)
    shards = []
    lost = []
    bits = 0
    for s in sorted(rng.sample(range(stripes), rows)):
        r = rng.randrange(g["bpc"])
        for d in sorted(dk):
            lba = entry_lba(g, dk[d], s, r)
            bits += flip(dk[d], g["start"] + s * g["slot"] + r * BS, BS, rng)
            shards.append({"stripe": s, "disk": d, "row": r, "lba": lba})
            if lba is not None:
                lost.append(lba)
    with open(out, "w") as f:
        json.dump({"shards": shards, "lost": sorted(lost)}, f)
    print(
        f"flipped {bits} bits in the same row of {rows} stripes on each of {len(dk)} disks: "
        f"{len(shards)} shards, {len(lost)} of them data blocks"
    )
    return 0


def match_scrub(shards_file, scrub_file) -> int:
    with open(shards_file) as f:
        want = {(x["stripe"], x["disk"], x["row"]) for x in json.load(f)["shards"]}
    with open(scrub_file) as f:
        rep = json.load(f)
    got = {(b["stripe"], b["disk"], b["row"]) for b in rep["bad"]}
    unrepaired = [b for b in rep["bad"] if not b["repaired"]]
    missed = sorted(want - got)
    extra = sorted(got - want)
    print(
        f"scrub listed {len(got)} bad shards: {len(want & got)} of the {len(want)} flipped, "
        f"{len(missed)} missed, {len(extra)} not flipped, {len(unrepaired)} not repaired"
    )
    for m in missed[:10]:
        print(f"  missed: stripe {m[0]} disk {m[1]} row {m[2]}", file=sys.stderr)
    for e in extra[:10]:
        print(f"  not flipped: stripe {e[0]} disk {e[1]} row {e[2]}", file=sys.stderr)
    if len(rep["bad"]) >= 1000:
        print("  the scrub's list is truncated at 1000: flip fewer shards", file=sys.stderr)
        return 1
    return 1 if missed or extra or unrepaired else 0


def read(uri, reference, shards_file) -> int:
    import nbd

    with open(shards_file) as f:
        lost = set(json.load(f)["lost"])
    with open(reference, "rb") as f:
        ref = f.read()
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    step = 1 << 20
    counts = {"blocks": 0, "ok": 0, "eio": 0, "eio_expected": 0, "wrong": 0, "eio_unexpected": 0}
    problems = []
    failed = set()

    def want(off, n):
        w = ref[off : off + n]
        return w + bytes(n - len(w))

    for off in range(0, size, step):
        n = min(step, size - off)
        try:
            buf = h.pread(n, off)
        except nbd.Error:
            buf = None
        for i in range(n // BS):
            lba = off // BS + i
            counts["blocks"] += 1
            if buf is None:
                try:
                    blk = h.pread(BS, lba * BS)
                except nbd.Error:
                    failed.add(lba)
                    continue
            else:
                blk = buf[i * BS : (i + 1) * BS]
            if blk == want(lba * BS, BS):
                counts["ok"] += 1
            else:
                counts["wrong"] += 1
                problems.append(f"block {lba}: wrong data")
    counts["eio"] = len(failed)
    counts["eio_expected"] = len(failed & lost)
    counts["eio_unexpected"] = len(failed - lost)
    not_failed = sorted(lost - failed)
    for lba in sorted(failed - lost)[:10]:
        problems.append(f"block {lba}: error, but its row lost at most m shards")
    for lba in not_failed[:10]:
        problems.append(f"block {lba}: lost with its row, yet read without error")
    print(
        "read {blocks} blocks: {ok} correct, {eio} errors ({eio_expected} of the ".format(**counts)
        + f"{len(lost)} lost blocks, "
        + "{eio_unexpected} others), {wrong} wrong data".format(**counts)
    )
    for p in problems[:20]:
        print("  " + p, file=sys.stderr)
    return 1 if counts["wrong"] or counts["eio_unexpected"] or not_failed else 0


def main() -> int:
    a = sys.argv
    if len(a) == 9 and a[1] == "rot":
        return rot(geometry(a[2]), disks(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]), a[8])
    if len(a) == 8 and a[1] == "rot-rows":
        return rot_rows(geometry(a[2]), disks(a[3]), int(a[4]), int(a[5]), int(a[6]), a[7])
    if len(a) == 4 and a[1] == "match-scrub":
        return match_scrub(a[2], a[3])
    if len(a) == 5 and a[1] == "read":
        return read(a[2], a[3], a[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
