"""Train/val/test split stratified by age band and gender, reproducible from a seed, saved as CSV."""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agecam.files import file_sha256
from agecam.training.names import AGE_BANDS_YEARS, FaceRecord, age_band, band_label

SPLITS = ("train", "val", "test")
SPLIT_FIELDS = ["file", "age", "gender", "race", "split"]


@dataclass(frozen=True)
class SplitRow:
    """One image of a split: path relative to the data folder, labels, and its part."""

    file: str
    age_years: int
    gender: int
    race: int
    split: str


def make_split(records: Sequence[FaceRecord], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[SplitRow]:
    """Assign every record to train/val/test so that each (age band, gender) stratum is cut by `fractions`.

    Each stratum gets floor(fraction x n) images per part; the leftover images of a stratum go to parts drawn
    with probability proportional to their remainders, so small strata do not all fall into train. The same
    records and seed always give the same split.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, found {list(fractions)}")
    rng = np.random.default_rng(seed)
    strata: dict[tuple[int, int], list[FaceRecord]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r.file):
        strata[(age_band(rec.age_years), rec.gender)].append(rec)
    rows: list[SplitRow] = []
    for key in sorted(strata):
        members = strata[key]
        order = rng.permutation(len(members))
        exact = fr * len(members)
        counts = np.floor(exact).astype(int)
        left = len(members) - counts.sum()
        if left:
            rem = exact - counts
            # the remainders sum to `left` and each is < 1, so at least `left` of them are positive
            for part in rng.choice(3, size=left, replace=False, p=rem / rem.sum()):
                counts[part] += 1
        bounds = np.cumsum(counts)
        for pos, idx in enumerate(order):
            rec = members[idx]
            part = SPLITS[int(np.searchsorted(bounds, pos, side="right"))]
            rows.append(SplitRow(rec.file, rec.age_years, rec.gender, rec.race, part))
    rows.sort(key=lambda r: r.file)
    return rows


def write_split_csv(rows: Sequence[SplitRow], path: str | Path) -> Path:
    """The split as CSV with header file,age,gender,race,split."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_FIELDS)
        for r in rows:
            w.writerow([r.file, r.age_years, r.gender, r.race, r.split])
    return path


def read_split_csv(path: str | Path, data_dir: str | Path | None = None) -> list[SplitRow]:
    """Read a split CSV; with data_dir, refuse it when listed files are missing there (names the first few)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(SPLIT_FIELDS) <= set(reader.fieldnames):
            raise ValueError(f"split file {path}: expected columns {SPLIT_FIELDS}, found {reader.fieldnames}")
        rows = []
        for line_no, d in enumerate(reader, start=2):
            if d["split"] not in SPLITS:
                raise ValueError(f"split file {path} line {line_no}: split {d['split']!r} not in {SPLITS}")
            rows.append(SplitRow(d["file"], int(d["age"]), int(d["gender"]), int(d["race"]), d["split"]))
    if data_dir is not None:
        missing = [r.file for r in rows if not (Path(data_dir) / r.file).is_file()]
        if missing:
            raise FileNotFoundError(f"split file {path}: {len(missing)} of {len(rows)} files are not in {data_dir} "
                                    f"(first: {missing[:3]}); is --data the folder the split was made from?")
    return rows


def band_shares(rows: Sequence[SplitRow]) -> dict[str, dict[str, float]]:
    """{split: {band label: share of that split's images}}."""
    out = {}
    for part in SPLITS:
        ages = [r.age_years for r in rows if r.split == part]
        c = Counter(age_band(a) for a in ages)
        out[part] = {band_label(b): (c[b] / len(ages) if ages else 0.0) for b in range(len(AGE_BANDS_YEARS))}
    return out


def split_counts(rows: Sequence[SplitRow]) -> dict[str, int]:
    """Number of images per part."""
    c = Counter(r.split for r in rows)
    return {part: c[part] for part in SPLITS}


def plot_split(rows: Sequence[SplitRow], path: str | Path) -> Path:
    """PNG with the train, val and test age histograms side by side (densities, same bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    bins = np.arange(0, 121, 5)
    for ax, part in zip(axes, SPLITS):
        ages = [r.age_years for r in rows if r.split == part]
        ax.hist(ages, bins=bins, density=True, color="tab:blue", alpha=0.8)
        ax.set_title(f"{part} (n={len(ages)}, mean {np.mean(ages) if ages else float('nan'):.1f} y)")
        ax.set_xlabel("age (years)")
    axes[0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def run_split(data_dir: str | Path, out_dir: str | Path, seed: int = 0, fractions=(0.8, 0.1, 0.1),
              clean=None, progress: bool = False) -> dict:
    """Clean the folder (unless `clean` is given), split it, write split.csv, split_hist.png, split_summary.json
    and the cleaning report; returns the summary."""
    from agecam.training.dataset import scan

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = clean if clean is not None else scan(data_dir, progress=progress)
    clean.write_report(out)
    rows = make_split(clean.kept, fractions, seed)
    csv_path = write_split_csv(rows, out / "split.csv")
    plot_split(rows, out / "split_hist.png")
    summary = {"split_file": str(csv_path), "sha256": file_sha256(csv_path), "seed": seed,
               "fractions": list(fractions), "counts": split_counts(rows), "band_shares": band_shares(rows),
               "n_excluded": len(clean.excluded), "stratified_by": ["age band", "gender"]}
    (out / "split_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
