"""Generate UTKFace-shaped 200x200 JPEG chips whose drawn faces carry a learnable age signal, plus planted anomalies."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SIZE_PX = 200
# Skin tones (RGB) by UTKFace race code: White, Black, Asian, Indian, Others.
_SKIN_RGB = ((236, 200, 178), (120, 80, 60), (232, 196, 150), (176, 126, 92), (205, 160, 125))
_HAIR_RGB = ((40, 28, 20), (90, 60, 30), (20, 20, 22), (150, 110, 60))
_WHITE_HAIR_RGB = np.array((228, 228, 228), dtype=np.float64)


def sample_age_years(rng: np.random.Generator) -> int:
    """An age drawn from a UTKFace-like mixture: many young adults, a bump of infants, a long old tail."""
    u = rng.random()
    if u < 0.12:
        age = rng.integers(1, 7)
    elif u < 0.20:
        age = rng.integers(7, 16)
    elif u < 0.68:
        age = round(float(np.clip(rng.normal(30, 8), 16, 60)))
    elif u < 0.97:
        age = rng.integers(40, 86)
    else:
        age = rng.integers(86, 111)
    return int(age)


def draw_face(age_years: float, gender: int, race: int, rng: np.random.Generator) -> np.ndarray:
    """A 200x200 RGB face drawing. Age shows as grey hair, forehead wrinkles, face size and skin tone; the
    background, position, pose and colours vary at random so that no two images hash alike."""
    s = SIZE_PX
    age = float(np.clip(age_years, 1, 116))
    # background: a random two-colour gradient in a random direction plus a few strong soft blobs, drawn at
    # 50x50 and scaled up (cheap, and low-frequency so that perceptual hashes of different images differ)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:50, 0:50] / 49.0
    t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)[..., None]
    small = c0 * (1 - t) + c1 * t
    for _ in range(4):
        bx, by, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.1, 0.35)]
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2.0 * r * r))[..., None]
        small = small * (1 - 0.85 * blob) + rng.integers(0, 256, 3) * 0.85 * blob
    img = cv2.resize(np.clip(small, 0, 255).astype(np.uint8), (s, s), interpolation=cv2.INTER_LINEAR)

    growth = 0.78 + 0.22 * min(age, 18.0) / 18.0  # children have smaller faces in the chip
    cx = s // 2 + int(rng.integers(-10, 11))
    cy = int(s * 0.53) + int(rng.integers(-8, 9))
    ax, ay = int(52 * growth + rng.integers(-3, 4)), int(66 * growth + rng.integers(-3, 4))
    grey = float(np.clip((age - 28.0) / 55.0, 0.0, 1.0))  # hair greys from about 28 to 83 years
    hair = np.array(_HAIR_RGB[int(rng.integers(0, len(_HAIR_RGB)))], dtype=np.float64)
    hair = tuple(int(v) for v in (1 - grey) * hair + grey * _WHITE_HAIR_RGB)
    skin = np.array(_SKIN_RGB[race], dtype=np.float64) + rng.normal(0, 6, 3)
    skin = skin * (1.0 - 0.25 * min(age, 90.0) / 90.0)  # skin darkens and dulls with age
    skin = tuple(int(v) for v in np.clip(skin, 0, 255))
    tilt = float(rng.uniform(-6, 6))

    if gender == 1:  # long hair falls behind the face
        cv2.ellipse(img, (cx, cy + 10), (ax + 14, ay + 18), tilt, 180, 360, hair, -1, cv2.LINE_AA)
        cv2.rectangle(img, (cx - ax - 14, cy + 10), (cx + ax + 14, min(s - 1, cy + ay + 20)), hair, -1)
    cv2.ellipse(img, (cx, cy), (ax, ay), tilt, 0, 360, skin, -1, cv2.LINE_AA)
    cv2.ellipse(img, (cx, cy - ay // 3), (ax + 4, int(ay * 0.75)), tilt, 198, 342, hair, -1, cv2.LINE_AA)

    dark = tuple(int(v * 0.55) for v in skin)
    eye_y = cy - int(ay * 0.12)
    for side in (-1, 1):
        ex = cx + side * int(ax * 0.42)
        cv2.circle(img, (ex, eye_y), max(3, int(7 * growth)), (250, 250, 250), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, eye_y), max(2, int(3.5 * growth)), (30, 30, 30), -1, cv2.LINE_AA)
        for k in range(int(max(0.0, age - 45.0) // 12)):  # crow's feet
            cv2.line(img, (ex + side * int(ax * 0.2), eye_y - 3 + 4 * k),
                     (ex + side * int(ax * 0.38), eye_y - 6 + 6 * k), dark, 1, cv2.LINE_AA)
    cv2.line(img, (cx, eye_y + 8), (cx - 4, cy + int(ay * 0.3)), dark, 2, cv2.LINE_AA)
    mouth_y = cy + int(ay * 0.5)
    cv2.ellipse(img, (cx, mouth_y), (int(ax * 0.35), 6), 0, 10, 170, (150, 40, 50), 2, cv2.LINE_AA)
    n_wrinkles = int(max(0.0, age - 20.0) // 9)  # forehead lines: one more every 9 years after 20
    top = cy - int(ay * 0.55)
    for k in range(min(n_wrinkles, 9)):
        y = top + 4 * k
        cv2.line(img, (cx - int(ax * 0.5), y), (cx + int(ax * 0.5), y + int(rng.integers(-2, 3))), dark, 2,
                 cv2.LINE_AA)
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """RGB array encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_utkface_like(out_dir: str | Path, n: int, seed: int = 0, anomalies: bool = True) -> dict:
    """Write `n` clean UTKFace-named chips (and, when asked, planted anomalies) into out_dir.

    Returns {"dir", "clean": [names], "ages": {name: age}, "planted": {name: reason},
    "duplicate_of": {name: original name}}; `planted` lists every file a correct cleaner must exclude.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ts0 = 20170101000000000 + (seed % 1000) * 1_000_000
    clean: list[str] = []
    ages: dict[str, int] = {}
    for i in range(n):
        age, gender, race = sample_age_years(rng), int(rng.integers(0, 2)), int(rng.integers(0, 5))
        name = f"{age}_{gender}_{race}_{ts0 + i}.jpg.chip.jpg"
        (out / name).write_bytes(jpeg_bytes(draw_face(age, gender, race, rng)))
        clean.append(name)
        ages[name] = age
    planted: dict[str, str] = {}
    duplicate_of: dict[str, str] = {}
    if anomalies and n >= 2:
        ts = 20179000000000000 + (seed % 1000) * 1000  # later than every clean stamp, so originals sort first

        def face(age=30, gender=0, race=0) -> bytes:
            return jpeg_bytes(draw_face(age, gender, race, rng))

        bad_names = {
            f"39_1_{ts + 1}.jpg.chip.jpg": "malformed_name",  # missing field, as in the real set
            f"x5_0_1_{ts + 2}.jpg.chip.jpg": "malformed_name",  # non-numeric age
            f"40_1__{ts + 3}.jpg.chip.jpg": "malformed_name",  # empty race
            f"0_1_2_{ts + 4}.jpg.chip.jpg": "age_out_of_range",
            f"117_0_1_{ts + 5}.jpg.chip.jpg": "age_out_of_range",
            f"30_2_1_{ts + 6}.jpg.chip.jpg": "unknown_gender",
            f"30_1_5_{ts + 7}.jpg.chip.jpg": "unknown_race",
        }
        for name, reason in bad_names.items():
            (out / name).write_bytes(face())
            planted[name] = reason
        name = f"33_0_2_{ts + 8}.jpg.chip.jpg"
        (out / name).write_bytes(b"this is not an image\n" * 20)
        planted[name] = "unreadable_image"
        name = f"34_1_3_{ts + 9}.jpg.chip.jpg"
        data = face(34, 1, 3)
        (out / name).write_bytes(data[: int(len(data) * 0.6)])
        planted[name] = "truncated_image"
        name = f"35_0_4_{ts + 10}.jpg.chip.jpg"
        (out / name).write_bytes(jpeg_bytes(cv2.resize(draw_face(35, 0, 4, rng), (160, 192))))
        planted[name] = "wrong_size"
        src = clean[0]
        a, g, r = src.split("_")[:3]
        name = f"{a}_{g}_{r}_{ts + 11}.jpg.chip.jpg"
        (out / name).write_bytes((out / src).read_bytes())
        planted[name], duplicate_of[name] = "exact_duplicate", src
        src = clean[1]
        a, g, r = src.split("_")[:3]
        name = f"{a}_{g}_{r}_{ts + 12}.jpg.chip.jpg"
        rgb = np.asarray(Image.open(out / src).convert("RGB")).astype(np.int16)
        (out / name).write_bytes(jpeg_bytes(np.clip(rgb + 4, 0, 255).astype(np.uint8), quality=70))
        planted[name], duplicate_of[name] = "near_duplicate", src
    return {"dir": str(out), "clean": clean, "ages": ages, "planted": planted, "duplicate_of": duplicate_of}
