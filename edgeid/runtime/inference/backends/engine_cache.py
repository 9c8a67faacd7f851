"""The on-disk cache of TensorRT engines (pure logic: no GPU, no TensorRT import).

A TensorRT engine is only valid for the exact model, TensorRT version, GPU and precision it was
built for, and a build takes minutes, so engines are cached under a key made of all of them::

    <cache dir>/
      trt-<TensorRT version>[-<CUDA variant, e.g. cu12>]/<gpu name>-sm<major><minor>/
        timing.cache                                  tactic timings, shared by every build here
        <model sha256[:16]>-<precision>-<key digest[:16]>.engine
        <model sha256[:16]>-<precision>-<key digest[:16]>.engine.json   the sidecar
        <...>.engine.lock                             held while the engine is being built
        .tmp-*                                        writes in progress

Every file is written atomically (temporary file, fsync, rename, fsync of the folder), the engine
before its sidecar. The sidecar records the full key and the engine's size and sha256, so an
engine that is truncated, bit-flipped, missing its sidecar, or copied from another GPU or
TensorRT version is detected before TensorRT ever sees its bytes, removed, and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "fp32")
EngineSource = Literal["cache", "built"]

# Bumped whenever the sidecar's fields change, so older sidecars read as stale, not as valid.
SIDECAR_SCHEMA = 1
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
TIMING_CACHE_NAME = "timing.cache"
# First line of a timing-cache file; the payload's sha256 follows it so corruption is detected.
TIMING_CACHE_MAGIC = b"edgeid-timing-cache-v1"
TMP_PREFIX = ".tmp-"
PLATFORM_DIR_PREFIX = "trt-"
# Characters of the sha256 and key digest in file names: unique in practice, still readable.
NAME_DIGEST_CHARS = 16
# Folder names from GPU names and versions stay short and portable.
SLUG_MAX_CHARS = 48
# A temporary file older than this is left over from an interrupted write (builds take minutes),
# so pruning may remove it without racing a writer.
STALE_TMP_SECONDS = 3600.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SLUG_UNSAFE = re.compile(r"[^a-z0-9.]+")

T = TypeVar("T")


class EngineCacheError(ModelError):
    """A cache key or entry is unusable in a way a rebuild cannot fix."""


class EngineLoadError(ModelError):
    """Engine bytes (from the cache or a fresh build) could not be deserialised or run."""


def _slug(text: str) -> str:
    slug = _SLUG_UNSAFE.sub("-", text.lower()).strip("-.")[:SLUG_MAX_CHARS]
    return slug or "unknown"


@dataclass(frozen=True)
class Platform:
    """The machine half of a key: what a timing cache and a set of engines were built on."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    # The CUDA build of TensorRT ("cu12", "cu13"): tensorrt-cu12 and -cu13 share version
    # numbers but their engines and timing caches are not interchangeable. "" when unknown.
    cuda_variant: str = ""

    @property
    def dir_parts(self) -> tuple[str, str]:
        major, minor = self.compute_capability
        variant = f"-{_slug(self.cuda_variant)}" if self.cuda_variant else ""
        return (
            f"{PLATFORM_DIR_PREFIX}{_slug(self.trt_version)}{variant}",
            f"{_slug(self.gpu_name)}-sm{major}{minor}",
        )

    def describe(self) -> str:
        major, minor = self.compute_capability
        variant = f" ({self.cuda_variant})" if self.cuda_variant else ""
        return f"{self.gpu_name} (sm_{major}{minor}), TensorRT {self.trt_version}{variant}"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any difference means a different engine."""

    model_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: Precision
    # Fingerprint of the builder settings (optimisation profiles, workspace): engines built with
    # other profiles accept other shapes, so they are not interchangeable either.
    build_settings: str = ""
    # TensorRT's CUDA build (see Platform.cuda_variant).
    cuda_variant: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not _SHA256.match(self.model_sha256):
            problems.append(f"model_sha256 {self.model_sha256!r} is not a lowercase sha256")
        if not self.trt_version.strip() or not self.gpu_name.strip():
            problems.append("trt_version and gpu_name must not be empty")
        cc = self.compute_capability
        if len(cc) != 2 or not all(isinstance(v, int) and v >= 0 for v in cc):
            problems.append(f"compute_capability {cc!r} must be two non-negative ints")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} must be one of {PRECISIONS}")
        if problems:
            raise EngineCacheError("invalid engine cache key: " + "; ".join(problems))

    @property
    def platform(self) -> Platform:
        return Platform(self.trt_version, self.gpu_name, self.compute_capability, self.cuda_variant)

    def fields(self) -> dict[str, object]:
        """The key as JSON values (the compute capability as a list)."""
        out: dict[str, object] = asdict(self)
        out["compute_capability"] = list(self.compute_capability)
        return out

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def file_stem(self) -> str:
        return (
            f"{self.model_sha256[:NAME_DIGEST_CHARS]}-{self.precision}-"
            f"{self.digest[:NAME_DIGEST_CHARS]}"
        )

    def describe(self) -> str:
        return f"model {self.model_sha256[:12]} {self.precision} on {self.platform.describe()}"


@dataclass(frozen=True)
class CachedEngine:
    """Serialised engine bytes and where they came from."""

    data: bytes
    source: EngineSource
    # Why a cached entry was thrown away before this build (None: a plain miss or a hit).
    replaced: str | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; some filesystems cannot open folders, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write`` writes, all or nothing.

    The data goes to a temporary file in the same folder, is fsynced and renamed over ``path``;
    if ``write`` (or anything else) fails, the temporary file is removed and ``path`` is left as
    it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


class EngineCache:
    """Engines and timing caches under one folder (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ----------------------------------------------------------------------------------------
    # Paths

    def platform_dir(self, platform: Platform) -> Path:
        return self.root.joinpath(*platform.dir_parts)

    def engine_path(self, key: EngineKey) -> Path:
        return self.platform_dir(key.platform) / f"{key.file_stem}{ENGINE_SUFFIX}"

    def sidecar_path(self, key: EngineKey) -> Path:
        return self.engine_path(key).with_name(f"{key.file_stem}{ENGINE_SUFFIX}{SIDECAR_SUFFIX}")

    def lock_path(self, key: EngineKey) -> Path:
        return self.engine_path(key).with_name(f"{key.file_stem}{ENGINE_SUFFIX}{LOCK_SUFFIX}")

    def timing_cache_path(self, platform: Platform) -> Path:
        return self.platform_dir(platform) / TIMING_CACHE_NAME

    # ----------------------------------------------------------------------------------------
    # Engines

    def check(self, key: EngineKey) -> tuple[bytes | None, str | None]:
        """The verified engine bytes, or None and why the entry is unusable (None: no entry)."""
        engine_path, sidecar_path = self.engine_path(key), self.sidecar_path(key)
        if not engine_path.exists() and not sidecar_path.exists():
            return None, None
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "has no sidecar (an interrupted write)"
        except (OSError, ValueError) as exc:
            return None, f"has an unreadable sidecar ({type(exc).__name__}: {exc})"
        if not isinstance(sidecar, dict) or sidecar.get("schema") != SIDECAR_SCHEMA:
            return None, "has a sidecar of another format"
        mismatch = _key_mismatch(key, sidecar.get("key"))
        if mismatch:
            return None, mismatch
        expected_sha, expected_size = sidecar.get("engine_sha256"), sidecar.get("engine_size")
        if not isinstance(expected_sha, str) or not isinstance(expected_size, int):
            return None, "has a sidecar without the engine's checksum"
        try:
            data = engine_path.read_bytes()
        except FileNotFoundError:
            return None, "has a sidecar but no engine file"
        except OSError as exc:
            return None, f"cannot be read ({exc.strerror})"
        if len(data) != expected_size:
            return None, f"is truncated or padded ({len(data)} bytes, expected {expected_size})"
        actual = sha256_hex(data)
        if actual != expected_sha:
            return None, (f"is corrupt (sha256 {actual[:12]}…, expected {expected_sha[:12]}…)")
        return data, None

    def load(self, key: EngineKey) -> bytes | None:
        """The verified engine, or None; an unusable entry is logged and removed."""
        data, problem = self.check(key)
        if problem is not None:
            logger.warning(
                "TensorRT engine cache: the entry for %s %s; discarding it",
                key.describe(),
                problem,
            )
            self.invalidate(key)
        return data

    def store(self, key: EngineKey, engine: bytes) -> Path:
        """Write the engine, then its sidecar (the sidecar's presence commits the entry)."""
        if not engine:
            raise EngineCacheError(f"refusing to cache an empty engine for {key.describe()}")
        engine_path = self.engine_path(key)
        self.sidecar_path(key).unlink(missing_ok=True)
        atomic_write_bytes(engine_path, engine)
        sidecar = {
            "schema": SIDECAR_SCHEMA,
            "key": key.fields(),
            "engine_file": engine_path.name,
            "engine_sha256": sha256_hex(engine),
            "engine_size": len(engine),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.sidecar_path(key), text.encode("utf-8"))
        return engine_path

    def invalidate(self, key: EngineKey) -> None:
        """Remove an entry (sidecar first, so a half-removed entry never looks valid)."""
        for path in (self.sidecar_path(key), self.engine_path(key)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("TensorRT engine cache: cannot remove %s (%s)", path, exc.strerror)

    @contextlib.contextmanager
    def build_lock(self, key: EngineKey) -> Iterator[None]:
        """Serialise builds of one engine across processes (a build costs minutes of GPU).

        Without a writable cache folder there is nothing to share, so no lock is taken.
        """
        lock_path = self.lock_path(key)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = lock_path.open("a+b")
        except OSError as exc:
            logger.warning(
                "TensorRT engine cache: %s is not writable (%s); engines will not be cached",
                lock_path.parent,
                exc.strerror,
            )
            yield
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> CachedEngine:
        """The cached engine if it verifies, else ``build()``'s, stored for next time.

        An entry that fails verification is removed and rebuilt; a failure of ``build`` itself
        propagates. Failing to write the cache only costs the next start a rebuild.
        """
        with self.build_lock(key):
            data, problem = self.check(key)
            if data is not None:
                logger.debug("TensorRT engine cache hit: %s", self.engine_path(key))
                return CachedEngine(data, "cache")
            if problem is not None:
                logger.warning(
                    "TensorRT engine cache: the entry for %s %s; rebuilding it",
                    key.describe(),
                    problem,
                )
                self.invalidate(key)
            else:
                logger.info("TensorRT engine cache miss: building %s", key.describe())
            started = time.monotonic()
            engine = build()
            logger.info(
                "TensorRT engine for %s built in %.1f s (%d bytes)",
                key.describe(),
                time.monotonic() - started,
                len(engine),
            )
            try:
                self.store(key, engine)
            except OSError as exc:
                logger.warning(
                    "TensorRT engine cache: cannot store %s (%s); it will be rebuilt next time",
                    self.engine_path(key),
                    exc.strerror or exc,
                )
            return CachedEngine(engine, "built", problem)

    # ----------------------------------------------------------------------------------------
    # Timing caches

    def load_timing_cache(self, platform: Platform) -> bytes | None:
        """The timing cache of this GPU and TensorRT version, or None when absent or corrupt."""
        path = self.timing_cache_path(platform)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("TensorRT timing cache %s unreadable (%s)", path, exc.strerror)
            return None
        header, _, payload = raw.partition(b"\n")
        parts = header.split(b" ")
        if len(parts) != 2 or parts[0] != TIMING_CACHE_MAGIC:
            logger.warning("TensorRT timing cache %s has an unknown format; ignoring it", path)
            return None
        if parts[1].decode("ascii", "replace") != sha256_hex(payload):
            logger.warning("TensorRT timing cache %s is corrupt; ignoring it", path)
            return None
        return payload

    def store_timing_cache(self, platform: Platform, data: bytes) -> None:
        """Replace the timing cache (advisory: a failure to write is logged, never raised)."""
        path = self.timing_cache_path(platform)
        header = TIMING_CACHE_MAGIC + b" " + sha256_hex(data).encode("ascii") + b"\n"
        try:
            atomic_write_bytes(path, header + data)
        except OSError as exc:
            logger.warning("TensorRT timing cache %s not written (%s)", path, exc.strerror)

    # ----------------------------------------------------------------------------------------
    # Pruning

    def prune(self, keep: Iterable[EngineKey], *, now: float | None = None) -> list[Path]:
        """Remove every entry ``keep`` does not name; return what was removed.

        Goes: engines (with sidecars and locks) of other models, precisions or builder settings;
        whole folders of other TensorRT versions or GPUs (their timing caches too); temporary
        files of interrupted writes older than ``STALE_TMP_SECONDS``. Files that are not the
        cache's own are left alone.
        """
        keys = list(keep)
        now = time.time() if now is None else now
        live_dirs = {self.platform_dir(k.platform) for k in keys}
        live_stems = {(self.platform_dir(k.platform), k.file_stem) for k in keys}
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for version_dir in sorted(self.root.glob(f"{PLATFORM_DIR_PREFIX}*")):
            if not version_dir.is_dir() or version_dir.is_symlink():
                continue
            for gpu_dir in sorted(p for p in version_dir.iterdir() if p.is_dir()):
                if gpu_dir.is_symlink():
                    continue
                if gpu_dir not in live_dirs:
                    shutil.rmtree(gpu_dir, ignore_errors=True)
                    removed.append(gpu_dir)
                    continue
                removed.extend(self._prune_platform_dir(gpu_dir, live_stems, now))
            with contextlib.suppress(OSError):
                version_dir.rmdir()  # only succeeds when empty
                removed.append(version_dir)
        if removed:
            logger.info("TensorRT engine cache: pruned %d stale entries", len(removed))
        return removed

    @staticmethod
    def _prune_platform_dir(
        folder: Path, live_stems: set[tuple[Path, str]], now: float
    ) -> list[Path]:
        removed: list[Path] = []
        engine_files = (ENGINE_SUFFIX, ENGINE_SUFFIX + SIDECAR_SUFFIX, ENGINE_SUFFIX + LOCK_SUFFIX)
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            name = path.name
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > STALE_TMP_SECONDS:
                        path.unlink()
                        removed.append(path)
                continue
            suffix = next((s for s in engine_files if name.endswith(s)), None)
            if suffix is None:
                continue  # the timing cache, or a file that is not ours
            if (folder, name[: -len(suffix)]) in live_stems:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        return removed


def _key_mismatch(key: EngineKey, recorded: object) -> str | None:
    """Why a sidecar's recorded key is not ``key`` (None when it is)."""
    if not isinstance(recorded, dict):
        return "has a sidecar without a key"
    expected = key.fields()
    if recorded.get("trt_version") != expected["trt_version"]:
        return f"was built by TensorRT {recorded.get('trt_version')}, not {expected['trt_version']}"
    if recorded.get("cuda_variant", "") != expected["cuda_variant"]:
        return (
            f"was built by TensorRT for CUDA variant {recorded.get('cuda_variant') or 'unknown'}, "
            f"not {key.cuda_variant or 'unknown'}"
        )
    if (
        recorded.get("gpu_name") != expected["gpu_name"]
        or recorded.get("compute_capability") != expected["compute_capability"]
    ):
        cc = recorded.get("compute_capability")
        return (
            f"was built for GPU {recorded.get('gpu_name')} (compute capability {cc}), "
            f"not {key.gpu_name} {list(key.compute_capability)}"
        )
    if recorded.get("model_sha256") != expected["model_sha256"]:
        return f"was built from another model ({str(recorded.get('model_sha256'))[:12]}…)"
    if recorded.get("precision") != expected["precision"]:
        return f"was built for {recorded.get('precision')}, not {key.precision}"
    if recorded != expected:
        return "was built with other builder settings"
    return None


def open_cached_engine(
    cache: EngineCache,
    key: EngineKey,
    build: Callable[[], bytes],
    load: Callable[[bytes], T],
) -> tuple[T, CachedEngine]:
    """Load the cached engine with ``load``; an engine that verifies but will not load is
    rebuilt once.

    ``load`` raises ``EngineLoadError`` for bytes it cannot use. A freshly built engine that
    will not load, or a failing rebuild, propagates: the caller falls back to another backend.
    """
    entry = cache.get_or_build(key, build)
    try:
        return load(entry.data), entry
    except EngineLoadError as exc:
        if entry.source == "built":
            raise
        problem = f"does not load ({exc})"
        logger.warning(
            "TensorRT engine cache: the cached engine for %s %s; rebuilding it",
            key.describe(),
            problem,
        )
        cache.invalidate(key)
    entry = cache.get_or_build(key, build)
    if entry.source == "built":
        entry = CachedEngine(entry.data, entry.source, problem)
    return load(entry.data), entry
