"""Detection scoring against annotated boxes: IoU, greedy one-to-one matching, imglab files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.inference.types import Box

# PASCAL VOC's criterion: a detection counts when it overlaps a true face by half.
MATCH_IOU = 0.5


def iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    inter_h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = inter_w * inter_h
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


def greedy_matches(truth: list[Box], found: list[Box], min_iou: float = MATCH_IOU) -> int:
    """How many true boxes get a distinct detection, best overlaps first."""
    pairs = sorted(
        ((iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)),
        reverse=True,
    )
    used_t: set[int] = set()
    used_f: set[int] = set()
    for overlap, i, j in pairs:
        if overlap >= min_iou and i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
    return len(used_t)


def read_imglab(*files: Path) -> dict[str, list[Box]]:
    """dlib imglab XML: ``<image file=...><box top= left= width= height=/>`` per face."""
    truth: dict[str, list[Box]] = {}
    for path in files:
        for image in ET.parse(path).getroot().iter("image"):
            boxes = []
            for b in image.iter("box"):
                left, top = float(b.get("left", 0)), float(b.get("top", 0))
                width, height = float(b.get("width", 0)), float(b.get("height", 0))
                boxes.append(Box(left, top, left + width, top + height))
            truth[image.get("file", "")] = boxes
    return truth


@dataclass(frozen=True)
class DetectionScore:
    faces: int
    detections: int
    matched: int

    @property
    def recall(self) -> float:
        return self.matched / self.faces if self.faces else 0.0

    @property
    def precision(self) -> float:
        return self.matched / self.detections if self.detections else 1.0

    def to_json(self) -> dict[str, object]:
        return {
            "faces": self.faces,
            "detections": self.detections,
            "matched": self.matched,
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            "match_iou": MATCH_IOU,
        }


def score(truth: dict[str, list[Box]], found: dict[str, list[Box]]) -> DetectionScore:
    return DetectionScore(
        faces=sum(len(t) for t in truth.values()),
        detections=sum(len(found.get(f, [])) for f in truth),
        matched=sum(greedy_matches(truth[f], found.get(f, [])) for f in truth),
    )
