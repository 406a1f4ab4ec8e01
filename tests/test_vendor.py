"""The pinned llama.cpp fetch: hash check, atomic unpack, corruption detection, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import sys
import tarfile
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import vendor_llama_cpp as vendor  # noqa: E402

PREFIX = "pkg-1.0/vendor/llama.cpp/"


def make_sdist(path: Path) -> str:
    """A small stand-in sdist with a llama.cpp part and files outside it; returns its sha256."""
    files = {
        PREFIX + "CMakeLists.txt": b"project(llama)\n",
        PREFIX + "models/ggml-vocab-x.gguf": b"GGUF....",
        "pkg-1.0/llama_cpp/__init__.py": b"# not vendored\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def lock_for(sha256: str, size: int) -> vendor.Lock:
    return vendor.Lock("pkg", "1.0", "pkg-1.0.tar.gz", size, sha256, "0" * 40, PREFIX)


@pytest.fixture
def cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, vendor.Lock]:
    """A vendor dir holding a valid cached sdist; any download attempt fails the test."""
    sdist = tmp_path / "pkg-1.0.tar.gz"
    digest = make_sdist(sdist)

    def no_download(*args: object) -> None:
        raise AssertionError("downloaded although a verified sdist was cached")

    monkeypatch.setattr(vendor, "download", no_download)
    return tmp_path, lock_for(digest, sdist.stat().st_size)


def test_unpacks_only_llama_cpp_and_stamps(cached: tuple[Path, vendor.Lock]) -> None:
    vdir, lock = cached
    tree = vendor.fetch(vdir, lock)
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()) == [
        ".ggq-vendor.json",
        "CMakeLists.txt",
        "models/ggml-vocab-x.gguf",
    ]
    stamp = json.loads((tree / ".ggq-vendor.json").read_text())
    assert stamp["sdist_sha256"] == lock.sha256
    assert vendor.tree_is_intact(lock, tree)
    # a second run finds everything in place: no download (the fixture forbids it), no re-unpack
    mtime = (tree / ".ggq-vendor.json").stat().st_mtime_ns
    vendor.fetch(vdir, lock)
    assert (tree / ".ggq-vendor.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["edit", "delete", "no-stamp"])
def test_damaged_tree_is_detected_and_unpacked_again(cached: tuple[Path, vendor.Lock], damage: str) -> None:
    vdir, lock = cached
    tree = vendor.fetch(vdir, lock)
    target = tree / "CMakeLists.txt"
    if damage == "edit":
        target.write_bytes(b"project(changed)\n")
    elif damage == "delete":
        target.unlink()
    else:
        (tree / ".ggq-vendor.json").unlink()
    assert not vendor.tree_is_intact(lock, tree)
    vendor.fetch(vdir, lock)
    assert target.read_bytes() == b"project(llama)\n"
    assert vendor.tree_is_intact(lock, tree)


def test_corrupted_download_is_rejected_and_nothing_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.tar.gz"
    lock = lock_for(make_sdist(good), good.stat().st_size)
    bad = bytearray(good.read_bytes())
    bad[len(bad) // 2] ^= 0xFF

    def corrupt_download(lock_: vendor.Lock, dest: Path) -> None:
        dest.write_bytes(bytes(bad))

    monkeypatch.setattr(vendor, "download", corrupt_download)
    vdir = tmp_path / "vendor"
    with pytest.raises(vendor.VendorError, match=r"sha256 [0-9a-f]{64} does not match the pinned"):
        vendor.fetch(vdir, lock)
    assert not (vdir / "llama.cpp").exists()
    assert not (vdir / lock.filename).exists()  # removed, so the next run downloads again
    assert list(vdir.iterdir()) == []


def test_offline_without_cache_says_what_to_download_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(vendor.urllib.request, "urlopen", offline)
    lock = lock_for("0" * 64, 1)
    with pytest.raises(vendor.VendorError) as err:
        vendor.fetch(tmp_path, lock)
    msg = str(err.value)
    assert "pkg==1.0" in msg and str(tmp_path / lock.filename) in msg and "offline" in msg


def _fake_tool(bindir: Path, name: str, output: str) -> None:
    path = bindir / name
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_missing_compiler_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(vendor.VendorError, match="C compiler"):
        vendor.check_tools()


def test_missing_or_old_cmake_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setenv("CXX", "/usr/bin/c++")
    with pytest.raises(vendor.VendorError, match="cmake not found"):
        vendor.check_tools()
    _fake_tool(tmp_path, "cmake", "cmake version 3.16.3")
    with pytest.raises(vendor.VendorError, match=r"version 3\.16\.3.*cmake >= 3\.21"):
        vendor.check_tools()
    _fake_tool(tmp_path, "cmake", "cmake version 3.28.1")
    vendor.check_tools()


def test_repository_tree_is_the_pinned_one() -> None:
    lock = vendor.Lock.load()
    assert lock.llama_cpp_commit.startswith("0c1e570")
    tree = ROOT / "vendor" / "llama.cpp"
    assert vendor.tree_is_intact(lock, tree), "vendor/llama.cpp differs from the pinned sdist"
