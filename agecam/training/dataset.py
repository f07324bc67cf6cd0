"""Scan a UTKFace folder: parse names, check images, find exact and near duplicates, report every exclusion."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image

from agecam.training.names import BadName, FaceRecord, parse_name

CHIP_SIZE_PX = (200, 200)  # UTKFace aligned & cropped chips are 200x200
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Exclusion reasons, in the order they are checked.
REASONS = ("malformed_name", "age_out_of_range", "unknown_gender", "unknown_race", "unreadable_image",
           "truncated_image", "wrong_size", "exact_duplicate", "near_duplicate")


@dataclass(frozen=True)
class Exclusion:
    """One excluded file, why, and (for duplicates) the kept file it duplicates."""

    file: str
    reason: str
    detail: str
    duplicate_of: str = ""


@dataclass
class CleanResult:
    """What a scan kept and what it excluded (every excluded file by name, with a reason)."""

    data_dir: str
    kept: list[FaceRecord] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    near_dup_max_bits: int = 0

    def counts(self) -> dict[str, int]:
        """Number of excluded files per reason (every reason listed, zeros included)."""
        out = {r: 0 for r in REASONS}
        for e in self.excluded:
            out[e.reason] += 1
        return out

    def write_report(self, out_dir: str | Path) -> tuple[Path, Path]:
        """cleaning_report.csv (one row per excluded file) and cleaning_report.json (summary + the same rows)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out_dir / "cleaning_report.csv", out_dir / "cleaning_report.json"
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "reason", "detail", "duplicate_of"])
            w.writeheader()
            for e in self.excluded:
                w.writerow(asdict(e))
        summary = {
            "data_dir": self.data_dir,
            "n_files": len(self.kept) + len(self.excluded),
            "n_kept": len(self.kept),
            "n_excluded": len(self.excluded),
            "excluded_by_reason": self.counts(),
            "near_duplicate_rule": f"pHash and dHash (64 bits each) both within {self.near_dup_max_bits} bits",
            "excluded": [asdict(e) for e in self.excluded],
        }
        json_path.write_text(json.dumps(summary, indent=1))
        return csv_path, json_path


def list_images(data_dir: Path) -> list[Path]:
    """Image files under data_dir (recursively), sorted by relative path."""
    return sorted((p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)),
                  key=lambda p: p.relative_to(data_dir).as_posix())


def jpeg_is_truncated(data: bytes) -> bool:
    """True when a JPEG's last scan is not followed by an end-of-image marker (FFD9).

    Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an FFD9 after the last
    start-of-scan (FFDA) exists exactly when the file was written to the end; an EXIF thumbnail's own EOI comes
    before the main scan and does not count.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    last_sos = data.rfind(b"\xff\xda")
    return last_sos < 0 or data.rfind(b"\xff\xd9") < last_sos


def _gray32(rgb: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(rgb).convert("L").resize((32, 32), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float64)


def phash_bits(rgb: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash: the 8x8 lowest frequencies (DC excluded from the median) of a 32x32 grey image."""
    coeffs = scipy.fft.dctn(_gray32(rgb), type=2, norm="ortho")[:8, :8].ravel()
    return coeffs > np.median(coeffs[1:])


def dhash_bits(rgb: np.ndarray) -> np.ndarray:
    """64-bit difference hash: is each pixel brighter than its right neighbour, on a 9x8 grey image."""
    gray = np.asarray(Image.fromarray(rgb).convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    return (gray[:, 1:] > gray[:, :-1]).ravel()


def pack_bits(bits: np.ndarray) -> np.uint64:
    """64 booleans as one unsigned integer."""
    return np.packbits(bits.astype(np.uint8)).view(">u8")[0].astype(np.uint64)


def hamming(a: np.ndarray | np.uint64, b: np.ndarray) -> np.ndarray:
    """Bit distance between packed 64-bit hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def read_rgb(path: Path) -> tuple[np.ndarray | None, str, str]:
    """(RGB uint8 array, reason, detail); the array is None and reason set when the file cannot be used."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        text = str(exc)
        reason = "truncated_image" if "truncated" in text.lower() else "unreadable_image"
        return None, reason, f"{type(exc).__name__}: {text}"
    if jpeg_is_truncated(data):
        return None, "truncated_image", f"no JPEG end-of-image marker after the last scan ({len(data)} bytes)"
    return rgb, "", ""


def scan(data_dir: str | Path, near_dup_max_bits: int = 3, progress: bool = False) -> CleanResult:
    """Check every image under data_dir; keep the usable ones, list each excluded file with its reason."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    result = CleanResult(data_dir=str(data_dir), near_dup_max_bits=near_dup_max_bits)
    candidates: list[tuple[FaceRecord, str, np.uint64, np.uint64]] = []
    paths = list_images(data_dir)
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, desc="scan", unit="img")
    for path in paths:
        rel = path.relative_to(data_dir).as_posix()
        try:
            age, gender, race, _ = parse_name(path.name)
        except BadName as exc:
            result.excluded.append(Exclusion(rel, exc.reason, str(exc)))
            continue
        rgb, reason, detail = read_rgb(path)
        if rgb is None:
            result.excluded.append(Exclusion(rel, reason, detail))
            continue
        if (rgb.shape[1], rgb.shape[0]) != CHIP_SIZE_PX:
            result.excluded.append(Exclusion(rel, "wrong_size", f"{rgb.shape[1]}x{rgb.shape[0]} px, expected "
                                                                  f"{CHIP_SIZE_PX[0]}x{CHIP_SIZE_PX[1]}"))
            continue
        digest = hashlib.sha256(rgb.tobytes()).hexdigest()
        candidates.append((FaceRecord(rel, age, gender, race), digest, pack_bits(phash_bits(rgb)),
                           pack_bits(dhash_bits(rgb))))
    result.kept, dups = _drop_duplicates(candidates, near_dup_max_bits)
    result.excluded.extend(dups)
    result.excluded.sort(key=lambda e: e.file)
    return result


def _drop_duplicates(candidates, max_bits: int) -> tuple[list[FaceRecord], list[Exclusion]]:
    """Keep the first file (by name) of each group of identical or near-identical images."""
    n = len(candidates)
    kept: list[FaceRecord] = []
    excluded: list[Exclusion] = []
    if n == 0:
        return kept, excluded
    ph = np.array([c[2] for c in candidates], dtype=np.uint64)
    dh = np.array([c[3] for c in candidates], dtype=np.uint64)
    first_by_digest: dict[str, int] = {}
    dropped = np.zeros(n, dtype=bool)
    for i, (rec, digest, _, _) in enumerate(candidates):
        if dropped[i]:
            continue
        if digest in first_by_digest:
            orig = candidates[first_by_digest[digest]][0]
            excluded.append(Exclusion(rec.file, "exact_duplicate", "identical pixels" + _label_note(rec, orig),
                                      orig.file))
            dropped[i] = True
            continue
        first_by_digest[digest] = i
        kept.append(rec)
        later = np.arange(i + 1, n)
        close = later[(hamming(ph[i], ph[i + 1:]) <= max_bits) & (hamming(dh[i], dh[i + 1:]) <= max_bits)
                      & ~dropped[i + 1:]]
        for j in close:
            other = candidates[j][0]
            if candidates[j][1] == digest:
                continue  # identical pixels: reported as exact_duplicate when reached
            dist = int(hamming(ph[i], ph[j:j + 1])[0]), int(hamming(dh[i], dh[j:j + 1])[0])
            excluded.append(Exclusion(other.file, "near_duplicate",
                                      f"pHash {dist[0]} bits, dHash {dist[1]} bits apart" + _label_note(other, rec),
                                      rec.file))
            dropped[j] = True
    return kept, excluded


def _label_note(a: FaceRecord, b: FaceRecord) -> str:
    la, lb = (a.age_years, a.gender, a.race), (b.age_years, b.gender, b.race)
    return "" if la == lb else f"; labels differ (age, gender, race) {la} vs {lb}"
