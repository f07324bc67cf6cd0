"""Exploratory analysis of a UTKFace folder: plots, the cleaning report and a Markdown summary."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from agecam.training.names import AGE_BANDS_YEARS, GENDERS, RACES, age_band, band_label

PLOTS = ("age_distribution.png", "counts_gender_ethnicity.png", "age_by_gender_ethnicity.png", "sample_faces.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_eda(data_dir: str | Path, out_dir: str | Path, clean=None, samples_per_band: int = 8, seed: int = 0,
            progress: bool = False) -> dict:
    """Scan (unless `clean` is given) and write PLOTS, cleaning_report.{csv,json}, eda_summary.md/.json."""
    from agecam.training.data import load_rgb
    from agecam.training.dataset import scan

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = clean if clean is not None else scan(data_dir, progress=progress)
    clean.write_report(out)
    recs = clean.kept
    if not recs:
        raise ValueError(f"no usable images in {data_dir} ({len(clean.excluded)} excluded; see cleaning_report.csv)")
    ages = np.array([r.age_years for r in recs])
    genders = np.array([r.gender for r in recs])
    races = np.array([r.race for r in recs])
    plt = _plt()

    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.hist(ages, bins=np.arange(0.5, ages.max() + 1.5, 1.0), color="tab:blue")
    ax.axvline(ages.mean(), color="k", ls="--", label=f"mean {ages.mean():.1f}")
    ax.axvline(np.median(ages), color="tab:red", ls=":", label=f"median {np.median(ages):.0f}")
    ax.set(xlabel="age (years)", ylabel="images", title=f"Age distribution (n={len(ages)})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    gc = [int((genders == g).sum()) for g in GENDERS]
    rc = [int((races == r).sum()) for r in RACES]
    axes[0].bar(list(GENDERS.values()), gc, color=["tab:blue", "tab:pink"])
    axes[0].set(title="Images by gender", ylabel="images")
    axes[1].bar(list(RACES.values()), rc, color="tab:green")
    axes[1].set(title="Images by ethnicity")
    for a, counts in zip(axes, (gc, rc)):
        for i, c in enumerate(counts):
            a.annotate(str(c), (i, c), ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].boxplot([ages[genders == g] for g in GENDERS], showmeans=True)
    axes[0].set_xticks(range(1, len(GENDERS) + 1), list(GENDERS.values()))
    axes[0].set(title="Age by gender", ylabel="age (years)")
    axes[1].boxplot([ages[races == r] if (races == r).any() else [np.nan] for r in RACES], showmeans=True)
    axes[1].set_xticks(range(1, len(RACES) + 1), list(RACES.values()))
    axes[1].set(title="Age by ethnicity")
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=100)
    plt.close(fig)

    rng = np.random.default_rng(seed)
    n_bands = len(AGE_BANDS_YEARS)
    fig, axes = plt.subplots(n_bands, samples_per_band, figsize=(samples_per_band * 1.1, n_bands * 1.2))
    bands = np.array([age_band(a) for a in ages])
    for b in range(n_bands):
        idx = np.flatnonzero(bands == b)
        pick = rng.choice(idx, size=min(samples_per_band, len(idx)), replace=False) if len(idx) else []
        for c in range(samples_per_band):
            ax = axes[b, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pick):
                r = recs[int(pick[c])]
                ax.imshow(load_rgb(Path(data_dir) / r.file))
                ax.set_title(str(r.age_years), fontsize=7, pad=1)
            if c == 0:
                ax.set_ylabel(band_label(b), fontsize=8)
    fig.suptitle("Sample faces per age band (title: age)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=90)
    plt.close(fig)

    band_counts = Counter(band_label(age_band(a)) for a in ages)
    summary = {
        "data_dir": str(data_dir), "n_files": len(recs) + len(clean.excluded), "n_kept": len(recs),
        "n_excluded": len(clean.excluded), "excluded_by_reason": clean.counts(),
        "age_years": {"mean": float(ages.mean()), "median": float(np.median(ages)), "std": float(ages.std()),
                      "min": int(ages.min()), "max": int(ages.max()), "over_100": int((ages > 100).sum())},
        "by_gender": {GENDERS[g]: {"n": c, "mean_age": float(ages[genders == g].mean()) if c else None}
                      for g, c in zip(GENDERS, gc)},
        "by_ethnicity": {RACES[r]: {"n": c, "mean_age": float(ages[races == r].mean()) if c else None}
                         for r, c in zip(RACES, rc)},
        "by_age_band": {band_label(b): band_counts.get(band_label(b), 0) for b in range(n_bands)},
        "predict_the_mean_mae_years": float(np.abs(ages - ages.mean()).mean()),
    }
    (out / "eda_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "eda_summary.md").write_text(_markdown(summary))
    return summary


def _markdown(s: dict) -> str:
    a = s["age_years"]
    lines = [
        "# UTKFace data summary", "",
        f"Folder `{s['data_dir']}`: {s['n_files']} image files, **{s['n_kept']} kept**, {s['n_excluded']} excluded "
        "(every excluded file is listed in `cleaning_report.csv`).", "",
        "| exclusion reason | files |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in s["excluded_by_reason"].items()], "",
        f"Age: mean {a['mean']:.1f} years, median {a['median']:.0f}, std {a['std']:.1f}, range {a['min']}-{a['max']}; "
        f"{a['over_100']} images above 100 (the model's last class is 100). Predicting the mean age for every image "
        f"gives an MAE of {s['predict_the_mean_mae_years']:.2f} years: the baseline a model must beat.", "",
        "| group | images | mean age |", "|---|---:|---:|",
        *[f"| {k} | {v['n']} | {v['mean_age']:.1f} |" if v["n"] else f"| {k} | 0 | - |"
          for k, v in {**s["by_gender"], **s["by_ethnicity"]}.items()], "",
        "| age band | images |", "|---|---:|", *[f"| {k} | {v} |" for k, v in s["by_age_band"].items()], "",
        "Plots: " + ", ".join(f"`{p}`" for p in PLOTS) + ".", "",
    ]
    return "\n".join(lines)
