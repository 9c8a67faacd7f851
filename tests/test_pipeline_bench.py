"""`edgeid bench pipeline`: runs on real images and reports the contract's keys.

No timing assertions: the figures depend on the machine and its load; these tests check that
the benchmark runs, counts what it processed, and says what it measured.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edgeid.cli import main
from edgeid.cli.commands.bench_cmd import load_benchmark
from edgeid.runtime.errors import BadInputError

# benchmarks/ is not an installed package; the command finds it beside edgeid, and so do we.
find_images = load_benchmark("pipeline_bench").find_images

STAGE_KEYS = {"decode", "detect", "landmarks_align", "embed"}
PHASE_KEYS = {
    "pipeline",
    "images",
    "faces",
    "failed",
    "images_per_s",
    "faces_per_s",
    "stage_ms_mean",
    "latency_ms",
    "cpu_ms_per_image",
    "peak_rss_mb",
    "rss_growth_mb",
}


def _bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main(["bench", "pipeline", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def _check_phase(phase: dict[str, object], images: int) -> None:
    assert set(phase) >= PHASE_KEYS
    assert phase["images"] == images
    assert isinstance(phase["faces"], int) and phase["faces"] >= images  # LFW: a face each
    stages = phase["stage_ms_mean"]
    assert isinstance(stages, dict) and set(stages) >= STAGE_KEYS
    assert all(v >= 0 for v in stages.values())
    latency = phase["latency_ms"]
    assert isinstance(latency, dict) and latency["p50"] <= latency["p95"] <= latency["max"]
    assert phase["images_per_s"] > 0 and phase["peak_rss_mb"] > 0  # type: ignore[operator]


def test_bench_pipeline_json_beside_dlib(
    models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("dlib")
    home = str(models_dir.parent)
    images = str(lfw_dir / "images")
    code, report, _ = _bench(capsys, "--images", images, "--limit", "3", "--home", home, "--json")
    assert code == 0
    assert report["images"] == 3 and report["limit"] == 3
    assert set(report) >= {"images_per_s", "ours", "baseline", "ratio_vs_baseline"}
    assert set(report) >= {"memory_method", "warmup_images", "stage_ms_mean_unit", "threads"}
    _check_phase(report["ours"], 3)  # type: ignore[arg-type]
    _check_phase(report["baseline"], 3)  # type: ignore[arg-type]
    assert isinstance(report["ratio_vs_baseline"], float) and report["ratio_vs_baseline"] > 0
    assert "dlib" in report["baseline"]["pipeline"]  # type: ignore[index]
    # The box's inference.ingest_streams (2): every pipeline again, two images at once.
    streamed = report["streamed"]
    assert isinstance(streamed, dict) and streamed["streams"] == 2
    assert set(streamed["precisions"]) == set(report["precisions"])  # type: ignore[arg-type]
    for precision, phase in streamed["precisions"].items():
        _check_phase(phase, 3)
        assert phase["streams"] == 2 and "2 streams" in phase["pipeline"]
        assert phase["faces"] == report["precisions"][precision]["faces"]  # type: ignore[index]
        one = report["precisions"][precision]["images_per_s"]  # type: ignore[index]
        assert streamed["ratio_vs_one_stream"][precision] == pytest.approx(
            phase["images_per_s"] / one, rel=0.02
        )
    _check_phase(streamed["baseline"], 3)
    assert "2 processes" in streamed["baseline"]["pipeline"]
    assert streamed["baseline"]["faces"] == report["baseline"]["faces"]  # type: ignore[index]
    assert all(r > 0 for r in streamed["ratio_vs_baseline_by_precision"].values())


def test_bench_flip_tta_and_mmod_like_for_like(
    models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _bench(
        capsys,
        *("--images", str(lfw_dir / "images"), "--limit", "2", "--detector", "mmod"),
        *("--flip-tta", "--no-baseline", "--streams", "1"),
        *("--home", str(models_dir.parent), "--json"),
    )
    assert code == 0
    assert report["detector"] == "mmod"
    _check_phase(report["ours_flip_tta"], 2)  # type: ignore[arg-type]
    assert "flip TTA" in report["ours_flip_tta"]["pipeline"]  # type: ignore[index]
    assert set(report["flip_tta_cost"]) == {"embed_ms_per_image_delta", "images_per_s_ratio"}  # type: ignore[arg-type]
    assert report["baseline"] is None and report["ratio_vs_baseline"] is None
    assert "streamed" not in report


def test_compare_detector_runs_the_as_built_path_beside_ours(
    models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _bench(
        capsys,
        *("--images", str(lfw_dir / "images"), "--limit", "3", "--compare-detector"),
        *("--no-baseline", "--streams", "1", "--home", str(models_dir.parent), "--json"),
    )
    assert code == 0
    path = report["detector_path"]
    assert isinstance(path, dict)
    _check_phase(path["as_built"], 3)
    _check_phase(report["ours"], 3)  # type: ignore[arg-type]
    assert "detector as built" in path["as_built"]["pipeline"]
    assert "as built" not in report["ours"]["pipeline"]  # type: ignore[index]
    assert path["as_built"]["faces"] == report["ours"]["faces"]  # type: ignore[index]
    ms = path["detect_ms_per_image"]
    assert ms["as_built"] > 0 and ms["ours"] > 0
    assert path["detect_speedup"] == pytest.approx(ms["as_built"] / ms["ours"], rel=0.02)
    assert path["images_per_s_speedup"] > 0 and path["cpu_per_image_speedup"] > 0


def test_without_dlib_the_baseline_is_omitted_with_a_note(
    models_dir: Path,
    lfw_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now raises ImportError
    home = str(models_dir.parent)
    images = str(lfw_dir / "images")
    code, report, _ = _bench(
        capsys, "--images", images, "--limit", "1", "--streams", "1", "--home", home, "--json"
    )
    assert code == 0
    assert report["baseline"] is None and report["ratio_vs_baseline"] is None
    assert "dlib is not importable" in str(report["baseline_note"])
    _check_phase(report["ours"], 1)  # type: ignore[arg-type]


def test_damaged_images_are_reported_not_fatal(
    tmp_path: Path, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sorted((lfw_dir / "images").rglob("*.jpg"))[:2]
    for path in good:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "zz_truncated.jpg").write_bytes(good[0].read_bytes()[:3000])
    code, report, _ = _bench(
        capsys,
        *("--images", str(tmp_path), "--no-baseline", "--home", str(models_dir.parent), "--json"),
    )
    assert code == 0
    ours = report["ours"]
    assert isinstance(ours, dict)
    assert ours["images"] == 2 and len(ours["failed"]) == 1
    assert "zz_truncated.jpg" in ours["failed"][0]
    for phase in report["streamed"]["precisions"].values():  # type: ignore[index]
        assert phase["images"] == 2 and len(phase["failed"]) == 1


def test_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _bench(capsys, "--images", str(tmp_path / "nowhere"), "--home", str(tmp_path))
    assert code == 2 and "not a folder of images" in err
    code, _, err = _bench(capsys, "--images", str(tmp_path), "--home", str(tmp_path))
    assert code == 2 and "no .jpg or .png images" in err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "pipeline", "--images", str(tmp_path), "--limit", "0"])
    assert exc.value.code == 2


def test_find_images_walks_sorted_and_limits(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.jpeg", "notes.txt", "d.gif"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_images(tmp_path)] == ["a.JPG", "b.png", "c.jpeg"]
    assert [p.name for p in find_images(tmp_path, 2)] == ["a.JPG", "b.png"]
    with pytest.raises(BadInputError):
        find_images(tmp_path / "sub" / "c.jpeg")
