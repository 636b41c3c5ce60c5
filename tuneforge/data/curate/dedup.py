"""Exact and near duplicates over a stream of rows; the first occurrence is kept, later ones point at it.

Exact: the row's text fields (every message, role-tagged, with its tool calls; the tool schemas) normalised (NFKC, lowercase, whitespace collapsed) and
hashed (8-byte BLAKE2b); equal hashes are duplicates.

Near: MinHash (datasketch) over shingles (`text.shingles`: word n-grams, or character n-grams for Chinese), then
LSH banding: signatures are cut into b bands of r values, and rows sharing any band are candidates. datasketch's
MinHashLSH chooses (b, r) for the threshold; each candidate is then checked by exact Jaccard of the two shingle sets
(32-bit shingle hashes, kept in a temp file on disk rather than in memory), so a reported pair is really above the
threshold, and both the MinHash estimate and the exact value are reported. Because candidates are verified, the
banding is tuned for recall (datasketch weights: false negatives 0.98, false positives 0.02): at the threshold
itself about 98% of pairs are found, 5 points above it more than 99.8%.

Why the band table is ours: datasketch's in-memory MinHashLSH keeps a Python set per bucket, about 4 KB per row
at b=17 (measured: 77 MiB of sets for 20k rows), which would dwarf the signatures on 100k+ rows. `BandTable` keeps
the same buckets as one sorted uint64/uint32 array pair plus a small dict of recent inserts: 12 bytes per band.

Memory per kept row: its signature (num_perm 32-bit values: 512 B by default), b band keys (12 B each), a file
offset, its source name and its exact-duplicate hash; shingles stay on disk and rows are not held. Measured on
100k rows: about 1.3 KB of RSS per kept row in all (bench/bench_clean.py).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from tuneforge.data.curate.text import normalize, shingles


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest()


class ExactIndex:
    """Normalised-text hashes of kept rows -> the source of the first one."""

    def __init__(self):
        self.first: dict[bytes, str] = {}

    def find(self, text: str) -> tuple[bytes, str | None]:
        key = exact_key(text)
        return key, self.first.get(key)

    def add(self, key: bytes, source: str) -> None:
        self.first.setdefault(key, source)


@dataclass
class NearMatch:
    source: str  # the kept row this one duplicates
    jaccard: float  # exact, over the shingle sets
    jaccard_estimated: float  # MinHash estimate


class BandTable:
    """LSH buckets: 64-bit band keys -> row ids, as sorted numpy arrays plus a dict of recent inserts (merged into
    the arrays when it outgrows an eighth of them: inserts stay amortised O(log n), memory about 12 bytes/key)."""

    def __init__(self):
        self.keys = np.empty(0, dtype=np.uint64)
        self.ids = np.empty(0, dtype=np.uint32)
        self.recent: dict[int, int | list[int]] = {}  # a list only where two rows share a bucket

    def query(self, keys: np.ndarray) -> set[int]:
        found = set()
        lo, hi = np.searchsorted(self.keys, keys, "left"), np.searchsorted(self.keys, keys, "right")
        for a, b in zip(lo.tolist(), hi.tolist()):
            found.update(self.ids[a:b].tolist())
        for key in keys.tolist():
            ids = self.recent.get(key)
            if ids is not None:
                found.update(ids if isinstance(ids, list) else (ids,))
        return found

    def insert(self, keys: np.ndarray, row: int) -> None:
        for key in keys.tolist():
            ids = self.recent.setdefault(key, row)
            if ids is not row:
                self.recent[key] = [*(ids if isinstance(ids, list) else [ids]), row]
        if len(self.recent) > max(20_000, len(self.keys) // 8):
            self._merge()

    def _merge(self) -> None:
        pairs = [(k, i) for k, ids in self.recent.items() for i in (ids if isinstance(ids, list) else (ids,))]
        keys = np.concatenate([self.keys, np.fromiter((k for k, _ in pairs), dtype=np.uint64, count=len(pairs))])
        ids = np.concatenate([self.ids, np.fromiter((i for _, i in pairs), dtype=np.uint32, count=len(pairs))])
        order = np.argsort(keys, kind="stable")
        self.keys, self.ids, self.recent = keys[order], ids[order], {}


_BLOCK = 4096  # signatures per block


class NearIndex:
    """MinHash LSH over kept rows with exact-Jaccard verification of candidates (see the module docstring)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, word_ngram: int = 3, char_ngram: int = 5,
                 workdir: str | Path | None = None):
        self.threshold, self.num_perm = threshold, num_perm
        self.word_ngram, self.char_ngram = word_ngram, char_ngram
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.02, 0.98))
        self.bands, self.rows = lsh.b, lsh.r
        # one odd 64-bit multiplier per signature position (and a salt per band): band keys in one numpy pass
        rng = np.random.default_rng(0)
        self._mult = rng.integers(1, 2**63, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)
        self._salt = rng.integers(0, 2**63, size=self.bands, dtype=np.uint64)
        self.table = BandTable()
        self._blocks: list[np.ndarray] = []  # signatures in fixed blocks: no doubling, no copies as rows arrive
        self.sources: list[str] = []
        self.offsets = array("q")  # start, length of each kept row's shingle hashes in the temp file
        fd, name = tempfile.mkstemp(prefix=".shingles.", suffix=".bin", dir=workdir)
        self._fd, self._path, self._end = fd, Path(name), 0
        self._template = MinHash(num_perm=num_perm, hashfunc=_identity)

    def hashes(self, text: str) -> np.ndarray:
        """Sorted unique 32-bit hashes of the text's shingles. CRC32 rather than datasketch's SHA-1: 10x faster,
        deterministic across runs, and MinHash's affine32 scheme mixes the bits before permuting them."""
        return np.unique(np.fromiter((zlib.crc32(s.encode("utf-8")) for s in
                                      shingles(text, self.word_ngram, self.char_ngram)), dtype=np.uint64))

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        m = MinHash(num_perm=self.num_perm, hashfunc=_identity, permutations=self._template.permutations,
                    scheme=self._template.scheme)
        m.update_batch(hashes.tolist())
        return m.hashvalues.astype(np.uint32)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        bands = signature[:self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):  # multiplication modulo 2^64 is the point
            mixed = (bands * self._mult).sum(axis=1, dtype=np.uint64) ^ self._salt
            return mixed ^ (mixed >> np.uint64(29))

    def find(self, hashes: np.ndarray, signature: np.ndarray) -> NearMatch | None:
        """The most similar kept row at or above the threshold by exact Jaccard, or None."""
        if hashes.size == 0:
            return None
        best = None
        for key in sorted(self.table.query(self.band_keys(signature))):
            exact = _jaccard(hashes, self._read(key))
            if exact >= self.threshold and (best is None or exact > best[1]):
                best = (key, exact)
        if best is None:
            return None
        key, exact = best
        estimate = float(np.mean(self._blocks[key // _BLOCK][key % _BLOCK] == signature))
        return NearMatch(self.sources[key], round(exact, 4), round(estimate, 4))

    def add(self, hashes: np.ndarray, signature: np.ndarray, source: str) -> None:
        if hashes.size == 0:
            return
        key = len(self.sources)
        data = hashes.astype(np.uint32).tobytes()
        os.pwrite(self._fd, data, self._end)
        self.offsets.extend((self._end, len(data)))
        self._end += len(data)
        if key % _BLOCK == 0:
            self._blocks.append(np.empty((_BLOCK, self.num_perm), dtype=np.uint32))
        self._blocks[-1][key % _BLOCK] = signature
        self.sources.append(source)
        self.table.insert(self.band_keys(signature), key)

    def _read(self, key: int) -> np.ndarray:
        offset, size = self.offsets[2 * key], self.offsets[2 * key + 1]
        return np.frombuffer(os.pread(self._fd, size, offset), dtype=np.uint32).astype(np.uint64)

    def close(self) -> None:
        os.close(self._fd)
        self._path.unlink(missing_ok=True)


def _identity(value: int) -> int:
    return value  # shingles are hashed once (CRC32) and reused for the exact check


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)

