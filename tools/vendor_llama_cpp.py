"""Fetch the pinned llama.cpp tree into vendor/llama.cpp and check the build tools.

Standard library only: this runs before the virtual environment has anything in it.

The tree is the one bundled in the llama-cpp-python source distribution named in
native/llama_cpp.lock.json. The sdist is downloaded once from the package registry into
vendor/, checked against the recorded sha256, and only its vendor/llama.cpp part unpacked.
A stamp written after unpacking records a digest of every file, so a partial or edited tree is
detected on the next run and unpacked again from the cached sdist (no second download).

    python tools/vendor_llama_cpp.py fetch         # idempotent
    python tools/vendor_llama_cpp.py check-tools   # compiler and cmake present and new enough
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ggq.files import sha256_file  # noqa: E402  (standard library only, like this script)

LOCK_FILE = ROOT / "native" / "llama_cpp.lock.json"
STAMP_NAME = ".ggq-vendor.json"
INDEX_JSON = "https://pypi.org/pypi/{package}/json"
CMAKE_MIN = (3, 21)


class VendorError(Exception):
    """A problem with the vendored llama.cpp tree or the tools that build it."""


@dataclass(frozen=True)
class Lock:
    package: str
    version: str
    filename: str
    size: int
    sha256: str
    llama_cpp_commit: str
    member_prefix: str

    @classmethod
    def load(cls, path: Path = LOCK_FILE) -> Lock:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def tree_digest(tree: Path) -> str:
    """One sha256 over every file's relative path and content, the stamp excluded."""
    h = hashlib.sha256()
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and p.name != STAMP_NAME):
        h.update(path.relative_to(tree).as_posix().encode() + b"\0")
        h.update(sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def sdist_url(lock: Lock) -> str:
    index = INDEX_JSON.format(package=lock.package)
    with urllib.request.urlopen(index, timeout=60) as resp:
        meta = json.load(resp)
    for entry in meta["releases"].get(lock.version, []):
        if entry["filename"] == lock.filename:
            return urllib.parse.urljoin(index, entry["url"])
    raise VendorError(f"{lock.filename} is not listed for {lock.package} {lock.version} at {index}")


def download(lock: Lock, dest: Path) -> None:
    try:
        url = sdist_url(lock)
        part = dest.with_suffix(dest.suffix + ".part")
        print(f"downloading {url} ({lock.size / 2**20:.0f} MiB)", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=120) as resp, part.open("wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
        part.replace(dest)
    except (urllib.error.URLError, OSError) as exc:
        raise VendorError(
            f"cannot download {lock.filename} ({exc}); offline? Download "
            f"{lock.package}=={lock.version} (the sdist, sha256 {lock.sha256}) with "
            f"`pip download --no-deps --no-binary :all: {lock.package}=={lock.version}` "
            f"on a connected machine and put it at {dest}"
        ) from exc


def verify_sdist(lock: Lock, sdist: Path) -> None:
    got = sha256_file(sdist)
    if got != lock.sha256:
        raise VendorError(
            f"{sdist}: sha256 {got} does not match the pinned {lock.sha256} "
            f"for {lock.package}=={lock.version}; the file was removed, run again to re-download"
        )


def unpack(lock: Lock, sdist: Path, tree: Path) -> None:
    """Extract only the llama.cpp part of the sdist, atomically: a temp dir, then a rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp.", dir=tree.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(lock.member_prefix) and len(m.name) > len(lock.member_prefix):
                    m.name = m.name[len(lock.member_prefix) :]
                    members.append(m)
            if not members:
                raise VendorError(f"{sdist}: no {lock.member_prefix} inside")
            tar.extractall(tmp, members=members, filter="data")
        stamp = {
            "sdist_sha256": lock.sha256,
            "commit": lock.llama_cpp_commit,
            "tree_sha256": tree_digest(tmp),
        }
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        tmp.replace(tree)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def tree_is_intact(lock: Lock, tree: Path) -> bool:
    stamp_path = tree / STAMP_NAME
    if not stamp_path.is_file():
        return False
    try:
        stamp = json.loads(stamp_path.read_text())
    except ValueError:
        return False
    return stamp.get("sdist_sha256") == lock.sha256 and stamp.get("tree_sha256") == tree_digest(tree)


def ensure_sdist(lock: Lock, vendor: Path) -> Path:
    """The pinned sdist in vendor/, downloaded only when absent, always checked by sha256."""
    sdist = vendor / lock.filename
    if not sdist.is_file():
        download(lock, sdist)
    try:
        verify_sdist(lock, sdist)
    except VendorError:
        sdist.unlink()
        raise
    return sdist


def fetch(vendor: Path = ROOT / "vendor", lock: Lock | None = None) -> Path:
    """Make vendor/llama.cpp the pinned tree; the sdist stays cached beside it for later runs."""
    lock = lock or Lock.load()
    vendor.mkdir(parents=True, exist_ok=True)
    tree = vendor / "llama.cpp"
    sdist = ensure_sdist(lock, vendor)
    if tree_is_intact(lock, tree):
        return tree
    if tree.exists():
        print(f"{tree}: missing or changed files, unpacking again", file=sys.stderr)
    unpack(lock, sdist, tree)
    return tree


def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return ()
    return tuple(int(x) for x in m.groups() if x is not None)


def check_tools() -> None:
    """One clear message naming what is missing, before a long build fails obscurely."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cc or not cxx:
        missing = " and ".join(
            n for n, v in (("a C compiler (cc)", cc), ("a C++ compiler (c++)", cxx)) if not v
        )
        raise VendorError(
            f"{missing} not found: install gcc/g++ or clang (e.g. apt-get install build-essential)"
        )
    cmake = shutil.which("cmake")
    if not cmake:
        raise VendorError(
            "cmake not found: install cmake >= 3.21 (apt-get install cmake, or pip install cmake)"
        )
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
    version = _version_tuple(out)
    if version < CMAKE_MIN:
        need = ".".join(map(str, CMAKE_MIN))
        raise VendorError(
            f"{cmake} is version {out.splitlines()[0] if out else '?'}; llama.cpp needs cmake >= {need}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["fetch", "check-tools"])
    parser.add_argument("--vendor", type=Path, default=ROOT / "vendor")
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            print(fetch(args.vendor))
        else:
            check_tools()
    except VendorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
