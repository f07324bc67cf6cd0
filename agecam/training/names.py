"""UTKFace file names `[age]_[gender]_[race]_[date&time].jpg.chip.jpg`: parsing, codes and age bands."""
from __future__ import annotations

import re
from dataclasses import dataclass

AGE_MIN_YEARS = 1
AGE_MAX_YEARS = 116
GENDERS = {0: "male", 1: "female"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
# Age bands used for stratification, EDA and per-band metrics: (low, high) inclusive, in years.
AGE_BANDS_YEARS = ((1, 5), (6, 12), (13, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 79), (80, 116))

_SUFFIXES = (".jpg.chip.jpg", ".chip.jpg", ".jpg")


@dataclass(frozen=True)
class FaceRecord:
    """One usable UTKFace image: its path relative to the data folder and its labels."""

    file: str
    age_years: int
    gender: int
    race: int


class BadName(ValueError):
    """A file name that is not a valid UTKFace name; `reason` is a short code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_name(name: str) -> tuple[int, int, int, str]:
    """(age_years, gender, race, timestamp) from a UTKFace base name; raises BadName with a reason code.

    Reasons: malformed_name (missing or non-numeric field), age_out_of_range, unknown_gender, unknown_race.
    """
    stem = name
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        raise BadName("malformed_name", f"{name}: does not end with .jpg.chip.jpg")
    fields = stem.split("_")
    if len(fields) != 4:
        raise BadName("malformed_name", f"{name}: expected 4 fields age_gender_race_datetime, found {len(fields)}")
    bad = [label for label, value in zip(("age", "gender", "race", "datetime"), fields) if not re.fullmatch(r"\d+", value)]
    if bad:
        raise BadName("malformed_name", f"{name}: non-numeric or empty field(s): {', '.join(bad)}")
    age, gender, race = (int(v) for v in fields[:3])
    if not AGE_MIN_YEARS <= age <= AGE_MAX_YEARS:
        raise BadName("age_out_of_range", f"{name}: age {age} outside {AGE_MIN_YEARS}-{AGE_MAX_YEARS}")
    if gender not in GENDERS:
        raise BadName("unknown_gender", f"{name}: gender code {gender} not in {sorted(GENDERS)}")
    if race not in RACES:
        raise BadName("unknown_race", f"{name}: race code {race} not in {sorted(RACES)}")
    return age, gender, race, fields[3]


def age_band(age_years: float) -> int:
    """Index into AGE_BANDS_YEARS of the band holding this age (ages above the last band go to the last)."""
    for i, (_, high) in enumerate(AGE_BANDS_YEARS):
        if age_years <= high:
            return i
    return len(AGE_BANDS_YEARS) - 1


def band_label(index: int) -> str:
    """'20-29' style label of an age band."""
    low, high = AGE_BANDS_YEARS[index]
    return f"{low}-{high}" if high < AGE_MAX_YEARS else f"{low}+"
