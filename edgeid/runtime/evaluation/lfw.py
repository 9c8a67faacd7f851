"""LFW-style 1:1 verification accuracy (mated / non-mated pairs), with held-out thresholds.

The pairs file is LFW's: a header "N" (View 1: N mated then N non-mated pairs) or "F N"
(View 2: F folds of N mated then N non-mated). The threshold of each fold is chosen on the other
folds; a file with a single fold is split into ``SINGLE_FOLD_SPLITS`` interleaved parts for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.types import FloatArray, RGBImage

# Ten parts is LFW's own protocol size; used to hold thresholds out when a file has one fold.
SINGLE_FOLD_SPLITS = 10
# Score given to a pair where a face was not found: below any cosine, so always "different".
NO_FACE_SCORE = -2.0
TARGET_FMR = 1e-3


@dataclass(frozen=True)
class Pair:
    first: tuple[str, int]
    second: tuple[str, int]
    mated: bool


@dataclass(frozen=True)
class PairsFile:
    folds: list[list[Pair]]

    def all_pairs(self) -> list[Pair]:
        return [pair for fold in self.folds for pair in fold]


def _pair(tokens: list[str], line_no: int) -> Pair:
    try:
        if len(tokens) == 3:
            return Pair((tokens[0], int(tokens[1])), (tokens[0], int(tokens[2])), mated=True)
        if len(tokens) == 4:
            return Pair((tokens[0], int(tokens[1])), (tokens[2], int(tokens[3])), mated=False)
    except ValueError:
        pass
    raise BadInputError(f"pairs file line {line_no}: expected 'name i j' or 'name1 i name2 j'")


def parse_pairs(path: Path) -> PairsFile:
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read pairs file ({exc.strerror})") from exc
    if not lines:
        raise BadInputError(f"{path}: empty pairs file")
    header = lines[0]
    try:
        folds, per_side = (1, int(header[0])) if len(header) == 1 else map(int, header[:2])
    except ValueError as exc:
        raise BadInputError(f"{path}: first line must be 'N' or 'FOLDS N'") from exc
    body = lines[1:]
    if len(body) != folds * per_side * 2:
        raise BadInputError(
            f"{path}: header promises {folds * per_side * 2} pairs, file has {len(body)}"
        )
    size = per_side * 2
    parsed = [_pair(tokens, i + 2) for i, tokens in enumerate(body)]
    return PairsFile([parsed[f * size : (f + 1) * size] for f in range(folds)])


def image_path(images_dir: Path, name: str, index: int) -> Path:
    return images_dir / name / f"{name}_{index:04d}.jpg"


def best_threshold(scores: npt.NDArray[np.float64], mated: npt.NDArray[np.bool_]) -> float:
    """The threshold with the highest accuracy on these pairs (midpoints between scores)."""
    candidates = np.unique(scores)
    mids = np.concatenate([[candidates[0] - 1e-6], (candidates[:-1] + candidates[1:]) / 2])
    accuracies = [np.mean((scores >= t) == mated) for t in mids]
    return float(mids[int(np.argmax(accuracies))])


def _split_indices(pairs: PairsFile) -> list[npt.NDArray[np.int64]]:
    if len(pairs.folds) > 1:
        starts = np.cumsum([0] + [len(f) for f in pairs.folds])
        return [np.arange(starts[i], starts[i + 1]) for i in range(len(pairs.folds))]
    total = len(pairs.folds[0])
    return [np.arange(k, total, SINGLE_FOLD_SPLITS) for k in range(SINGLE_FOLD_SPLITS)]


@dataclass
class LfwReport:
    accuracy: float
    accuracy_std: float
    folds: int
    splits: int
    pairs: int
    mated_pairs: int
    non_mated_pairs: int
    images: int
    no_face: int
    ms_per_image: float
    tar_at_far_1e_3: float
    threshold_at_far_1e_3: float
    thresholds: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list, repr=False)
    mated: list[bool] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "accuracy": round(self.accuracy, 4),
            "accuracy_std": round(self.accuracy_std, 4),
            "folds": self.folds,
            "threshold_splits": self.splits,
            "threshold_selection": "best accuracy on the other splits (held out)",
            "pairs": self.pairs,
            "mated_pairs": self.mated_pairs,
            "non_mated_pairs": self.non_mated_pairs,
            "images": self.images,
            "no_face": self.no_face,
            "ms_per_image": round(self.ms_per_image, 1),
            "tar_at_far_1e-3": round(self.tar_at_far_1e_3, 4),
            "threshold_at_far_1e-3": round(self.threshold_at_far_1e_3, 4),
            # FMR resolution is 1/non_mated_pairs: with 500 non-mated pairs, FMR=1e-3 means none.
            "fmr_resolution": round(1 / max(self.non_mated_pairs, 1), 6),
            "thresholds": [round(t, 4) for t in self.thresholds],
        }


def tar_at_fmr(
    scores: npt.NDArray[np.float64], mated: npt.NDArray[np.bool_], fmr: float
) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose false match rate is <= fmr."""
    non_mated = np.sort(scores[~mated])[::-1]
    allowed = int(np.floor(fmr * len(non_mated)))  # false matches we may accept
    threshold = float(non_mated[allowed] + 1e-9) if allowed < len(non_mated) else -np.inf
    return float(np.mean(scores[mated] >= threshold)), threshold


def evaluate(
    pairs: PairsFile,
    images_dir: Path,
    embed: Callable[[Path], FloatArray | None],
    progress: Callable[[int, int], None] | None = None,
) -> LfwReport:
    """Embed every image the pairs name once, score every pair, report held-out accuracy."""
    all_pairs = pairs.all_pairs()
    needed = sorted({p.first for p in all_pairs} | {p.second for p in all_pairs})
    templates: dict[tuple[str, int], FloatArray | None] = {}
    started = time.perf_counter()
    for done, key in enumerate(needed, start=1):
        templates[key] = embed(image_path(images_dir, *key))
        if progress:
            progress(done, len(needed))
    elapsed = time.perf_counter() - started
    scores = np.array([_score(templates[p.first], templates[p.second]) for p in all_pairs])
    mated = np.array([p.mated for p in all_pairs])
    splits = _split_indices(pairs)
    accuracies, thresholds = [], []
    for held_out in splits:
        train = np.setdiff1d(np.arange(len(all_pairs)), held_out)
        threshold = best_threshold(scores[train], mated[train])
        thresholds.append(threshold)
        accuracies.append(float(np.mean((scores[held_out] >= threshold) == mated[held_out])))
    tar, far_threshold = tar_at_fmr(scores, mated, TARGET_FMR)
    return LfwReport(
        accuracy=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        folds=len(pairs.folds),
        splits=len(splits),
        pairs=len(all_pairs),
        mated_pairs=int(mated.sum()),
        non_mated_pairs=int((~mated).sum()),
        images=len(needed),
        no_face=sum(1 for t in templates.values() if t is None),
        ms_per_image=1000 * elapsed / max(len(needed), 1),
        tar_at_far_1e_3=tar,
        threshold_at_far_1e_3=far_threshold,
        thresholds=thresholds,
        scores=[float(s) for s in scores],
        mated=[bool(m) for m in mated],
    )


def _score(a: FloatArray | None, b: FloatArray | None) -> float:
    if a is None or b is None:
        return NO_FACE_SCORE
    return float(np.dot(a, b))


def roc_points(report: LfwReport) -> Iterable[tuple[float, float]]:
    """(FMR, TAR) for every distinct threshold, from strictest to most lenient."""
    scores = np.asarray(report.scores)
    mated = np.asarray(report.mated)
    for threshold in np.unique(scores)[::-1]:
        accepted = scores >= threshold
        yield float(np.mean(accepted[~mated])), float(np.mean(accepted[mated]))


def central_index(boxes: list[tuple[float, float, float, float]], width: int, height: int) -> int:
    """The box whose centre is nearest the image centre: LFW's subject is centred."""
    cx, cy = width / 2, height / 2
    distances = [((x0 + x1) / 2 - cx) ** 2 + ((y0 + y1) / 2 - cy) ** 2 for x0, y0, x1, y1 in boxes]
    return int(np.argmin(distances))


class _Embeds(Protocol):
    def embed(self, image: RGBImage) -> list[Any]: ...


def central_face_embedder(pipeline: _Embeds) -> Callable[[Path], FloatArray | None]:
    """Embed the most central face of each image (None when no face is found)."""

    def embed(path: Path) -> FloatArray | None:
        image = load_image(path)
        faces = pipeline.embed(image)
        if not faces:
            return None
        boxes = [(f.box.x0, f.box.y0, f.box.x1, f.box.y1) for f in faces]
        embedding: FloatArray | None = faces[
            central_index(boxes, image.shape[1], image.shape[0])
        ].embedding
        return embedding

    return embed
