"""UTKFace names, cleaning, EDA and split on generated UTKFace-shaped sets (no torch needed except the parity test)."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from agecam.training.dataset import dhash_bits, hamming, pack_bits, phash_bits, scan
from agecam.training.eda import PLOTS, run_eda
from agecam.training.names import BadName, FaceRecord, age_band, parse_name
from agecam.training.split import band_shares, make_split, read_split_csv, run_split
from agecam.training.synth import draw_face, make_utkface_like
from tests.helpers import not_uniform


@pytest.mark.parametrize("name, expected", [
    ("25_0_1_20170116174525125.jpg.chip.jpg", (25, 0, 1)),
    ("116_1_4_20170116174525125.jpg.chip.jpg", (116, 1, 4)),
    ("1_1_0_20161219203650636.jpg.chip.jpg", (1, 1, 0)),
    ("39_1_20170116174525125.jpg.chip.jpg", "malformed_name"),
    ("x5_0_1_20170116174525125.jpg.chip.jpg", "malformed_name"),
    ("40_1__20170116174525125.jpg.chip.jpg", "malformed_name"),
    ("notes.txt", "malformed_name"),
    ("0_1_2_20170116174525125.jpg.chip.jpg", "age_out_of_range"),
    ("117_0_1_20170116174525125.jpg.chip.jpg", "age_out_of_range"),
    ("30_2_1_20170116174525125.jpg.chip.jpg", "unknown_gender"),
    ("30_1_5_20170116174525125.jpg.chip.jpg", "unknown_race"),
])
def test_parse_name_table(name, expected):
    # given a UTKFace file name, when parsed, then labels or the right rejection reason come out
    if isinstance(expected, tuple):
        assert parse_name(name)[:3] == expected, f"{name} parsed wrong"
    else:
        with pytest.raises(BadName) as info:
            parse_name(name)
        assert info.value.reason == expected, f"{name}: reason {info.value.reason}, expected {expected}"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_utkface_like(tmp_path_factory.mktemp("utk"), 120, seed=7, anomalies=True)


def test_cleaner_lists_every_planted_anomaly_and_nothing_else(planted):
    # given a generated set with planted anomalies; when scanned
    res = scan(planted["dir"])
    got = {e.file: e.reason for e in res.excluded}
    # then exactly the planted files are excluded, each for its planted reason
    assert got == planted["planted"], (
        f"missed: {sorted(set(planted['planted']) - set(got))}; wrongly excluded: {sorted(set(got) - set(planted['planted']))}; "
        f"wrong reason: {[(f, got[f], planted['planted'][f]) for f in set(got) & set(planted['planted']) if got[f] != planted['planted'][f]]}")
    dup_of = {e.file: e.duplicate_of for e in res.excluded if e.duplicate_of}
    assert dup_of == planted["duplicate_of"], f"duplicates point at {dup_of}, expected {planted['duplicate_of']}"
    assert sorted(r.file for r in res.kept) == sorted(planted["clean"]), "kept set differs from the clean files"


def test_cleaning_report_written_with_every_exclusion(planted, tmp_path):
    # given a scan; when the report is written; then CSV and JSON list every excluded file with its reason
    res = scan(planted["dir"])
    csv_path, json_path = res.write_report(tmp_path)
    with csv_path.open() as f:
        rows = {r["file"]: r["reason"] for r in csv.DictReader(f)}
    assert rows == planted["planted"], "CSV report does not list exactly the excluded files"
    js = json.loads(json_path.read_text())
    assert js["n_excluded"] == len(planted["planted"]) and js["n_kept"] == len(planted["clean"]), js


def test_perceptual_hash_separates_near_duplicates_from_other_faces():
    # given one drawn face, a re-encoded brighter copy, and a different face
    rng = np.random.default_rng(3)
    a = draw_face(40, 0, 1, rng)
    near = np.clip(a.astype(np.int16) + 5, 0, 255).astype(np.uint8)
    other = draw_face(40, 0, 1, rng)
    # when hashed; then the copy is within a few bits and the other face is far
    for fn in (phash_bits, dhash_bits):
        ha, hn, ho = (pack_bits(fn(x)) for x in (a, near, other))
        d_near, d_other = int(hamming(ha, np.array([hn]))[0]), int(hamming(ha, np.array([ho]))[0])
        assert d_near <= 3 < d_other, f"{fn.__name__}: near copy {d_near} bits, other face {d_other} bits"


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    from agecam.training.synth import sample_age_years

    return [FaceRecord(f"{i:05d}.jpg", sample_age_years(rng), int(rng.integers(0, 2)), int(rng.integers(0, 5)))
            for i in range(3000)]


def test_split_is_stratified_and_reproducible(records):
    # given 3000 labelled records; when split twice with one seed and once with another
    a, b, c = make_split(records, seed=5), make_split(records, seed=5), make_split(records, seed=6)
    # then the same seed gives the same split, another seed a different one
    assert a == b, "same seed gave different splits"
    assert a != c, "different seeds gave the same split"
    counts = {s: sum(r.split == s for r in a) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 2400) <= 10 and abs(counts["val"] - 300) <= 10, f"fractions off: {counts}"
    # and every age band has the same share in train, val and test within 2 points
    shares = band_shares(a)
    for band in shares["train"]:
        vals = [shares[s][band] for s in ("train", "val", "test")]
        assert max(vals) - min(vals) <= 0.02, f"band {band} shares differ: {vals}"
    # and each (band, gender) stratum is split by the fractions
    for g in (0, 1):
        in_stratum = [r for r in a if r.gender == g and age_band(r.age_years) == 4]
        share = sum(r.split == "train" for r in in_stratum) / len(in_stratum)
        assert abs(share - 0.8) < 0.02, f"stratum (30-39, gender {g}) train share {share:.3f}"


def test_eda_and_split_write_their_files(planted, tmp_path):
    # given a generated folder; when EDA and split run
    res = scan(planted["dir"])
    summary = run_eda(planted["dir"], tmp_path / "eda", clean=res, samples_per_band=3)
    sp = run_split(planted["dir"], tmp_path / "split", seed=1, clean=res)
    # then every plot has something drawn on it, and every report reads back
    for png in [tmp_path / "eda" / n for n in PLOTS if n.endswith(".png")] + [tmp_path / "split" / "split_hist.png"]:
        assert not_uniform(cv2.imread(str(png))), f"{png.name} is missing or blank"
    for folder in (tmp_path / "eda", tmp_path / "split"):
        with (folder / "cleaning_report.csv").open() as f:
            report = {r["file"]: r["reason"] for r in csv.DictReader(f)}
        assert report == planted["planted"], f"{folder.name}/cleaning_report.csv does not list the excluded files"
    assert json.loads((tmp_path / "eda" / "cleaning_report.json").read_text())["n_excluded"] == len(planted["planted"])
    assert json.loads((tmp_path / "eda" / "eda_summary.json").read_text())["n_kept"] == len(planted["clean"])
    assert sum(json.loads((tmp_path / "split" / "split_summary.json").read_text())["counts"].values()) == \
        len(planted["clean"]), "split_summary.json counts differ from the kept files"
    md = (tmp_path / "eda" / "eda_summary.md").read_text()
    assert f"**{len(planted['clean'])} kept**" in md and "near_duplicate | 1" in md, md[:400]
    assert summary["n_kept"] == len(planted["clean"])
    # and the split CSV reads back with every kept file exactly once
    rows = read_split_csv(sp["split_file"], planted["dir"])
    assert sorted(r.file for r in rows) == sorted(planted["clean"]), "split CSV does not hold the kept files"
    assert sum(sp["counts"].values()) == len(planted["clean"])
