"""The guest image: Debian's 6.1 kernel and a busybox initramfs, built once and cached.

:func:`ensure_image` returns a :class:`GuestImage` (``vmlinuz``, ``initramfs.cpio.gz`` and the
kernel version). It builds only when the cache folder has no valid stamp; the stamp records a
hash of the init script (``init.sh`` next to this module), the module list and
:data:`BUILD_FORMAT`, so editing any of them rebuilds. The cache folder is ``build/guest/`` under
the repository root, or ``$OFFCARD_GUEST_DIR``.

What a build needs (Debian packages, nothing else is downloaded):

* ``apt-cache`` / ``apt-get download`` / ``dpkg-deb`` for the kernel package (Debian's
  ``linux-image-6.1.0-<abi>-amd64``, the one ``linux-image-amd64`` depends on today); the
  package is downloaded into a temporary folder and read, never installed;
* ``/bin/busybox`` of ``busybox-static`` (a static binary: the initramfs has no libc).

The initramfs is a gzip-compressed newc cpio written by :class:`NewcWriter` (no ``cpio``
command needed): busybox and a symlink per applet in ``/bin`` (``/sbin``, ``/usr/bin`` and
``/usr/sbin`` link to it), the virtio modules of :data:`MODULES` in ``/lib/modules/`` (plain
``.ko``: compressed modules are decompressed here, busybox ``insmod`` reads no xz), their load
order in ``/etc/offcard/modules``, ``/dev/console`` and ``/init``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "BUILD_FORMAT",
    "BUSYBOX",
    "INIT_SCRIPT",
    "MODULES",
    "GuestImage",
    "ImageError",
    "NewcWriter",
    "default_cache_dir",
    "ensure_image",
    "find_kernel_package",
    "read_newc",
]

REPO = Path(__file__).resolve().parents[2]

#: Bumped by hand when the layout of the image changes in a way the stamp cannot see.
BUILD_FORMAT = 1

#: The init script that becomes ``/init``.
INIT_SCRIPT = Path(__file__).resolve().with_name("init.sh")

#: busybox of Debian's ``busybox-static``.
BUSYBOX = Path("/bin/busybox")

#: Kernel modules in load order: every virtio piece of Debian's kernel is a module, and
#: ``virtio_pci`` needs ``virtio_pci_legacy_dev`` even for a modern-only device. The build checks
#: this order against each module's ``depends=``.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)

KERNEL_METAPACKAGE = "linux-image-amd64"
STAMP_NAME = "stamp.json"
KERNEL_NAME = "vmlinuz"
INITRAMFS_NAME = "initramfs.cpio.gz"


class ImageError(RuntimeError):
    """A guest image build failed; the message is one line saying what and why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the kernel, the initramfs and the kernel release (``6.1.0-57-amd64``)."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    kernel_package: str


def default_cache_dir() -> Path:
    """``$OFFCARD_GUEST_DIR`` if set, else ``build/guest/`` under the repository root."""
    env = os.environ.get("OFFCARD_GUEST_DIR")
    return Path(env) if env else REPO / "build" / "guest"


def init_script_hash(path: Path | None = None) -> str:
    """sha256 of the init script (:data:`INIT_SCRIPT` by default)."""
    return hashlib.sha256((path or INIT_SCRIPT).read_bytes()).hexdigest()


def _wanted_stamp() -> dict:
    return {"format": BUILD_FORMAT, "init_sha256": init_script_hash(), "modules": list(MODULES)}


def _read_stamp(cache: Path) -> dict | None:
    try:
        stamp = json.loads((cache / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not all((cache / name).is_file() for name in (KERNEL_NAME, INITRAMFS_NAME)):
        return None
    wanted = _wanted_stamp()
    if any(stamp.get(key) != value for key, value in wanted.items()):
        return None
    return stamp


def _image(cache: Path, stamp: dict) -> GuestImage:
    return GuestImage(cache / KERNEL_NAME, cache / INITRAMFS_NAME, stamp["kernel_version"],
                      stamp["kernel_package"])


def ensure_image(cache_dir: Path | str | None = None, *, rebuild: bool = False,
                 kernel_package: str | None = None, log=None) -> GuestImage:
    """Return the cached guest image, building it first if the stamp is missing or stale.

    ``kernel_package`` forces a kernel package (default: what ``linux-image-amd64`` depends
    on; a cached image built from another package is rebuilt). ``log`` is called with progress
    lines (``None``: silent). Concurrent callers are serialized by a lock file in the cache
    folder. Raises :class:`ImageError` with a one-line message on failure.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = None if rebuild else _read_stamp(cache)
        if stamp is not None and kernel_package in (None, stamp["kernel_package"]):
            return _image(cache, stamp)
        return _build(cache, kernel_package, log or (lambda line: None))


# --- the build ------------------------------------------------------------------------------


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise ImageError(f"{what} failed: {argv[0]} not found (Debian's apt/dpkg needed)") \
            from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {_last_line(proc.stderr or proc.stdout)}")
    return proc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["(no output)"])[-1]


def find_kernel_package(*, update: bool = True) -> str:
    """The kernel package ``linux-image-amd64`` depends on (``linux-image-6.1.0-57-amd64``).

    If apt does not know the metapackage and we are root, runs ``apt-get update`` once.
    """
    proc = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE], capture_output=True,
                          text=True) if shutil.which("apt-cache") else None
    if proc is None:
        raise ImageError("apt-cache not found: the guest image is built from Debian packages")
    found = re.search(r"Depends:\s*(linux-image-\S+)", proc.stdout)
    if found:
        return found.group(1)
    if update and os.geteuid() == 0:
        _run(["apt-get", "update"], "apt-get update")
        return find_kernel_package(update=False)
    hint = "" if os.geteuid() == 0 else " (run `sudo apt-get update`)"
    raise ImageError(f"apt-cache depends {KERNEL_METAPACKAGE} names no kernel package{hint}: "
                     f"{_last_line(proc.stderr or proc.stdout)}")


def _build(cache: Path, kernel_package: str | None, log) -> GuestImage:
    busybox = _check_busybox(BUSYBOX)
    package = kernel_package or find_kernel_package()
    with tempfile.TemporaryDirectory(prefix="offcard_guest_") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o755)
        log(f"guest: apt-get download {package}")
        _run(["apt-get", "download", package], f"apt-get download {package}", cwd=tmp_path)
        debs = sorted(tmp_path.glob("*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} failed: no .deb in {tmp_path}")
        log(f"guest: reading {debs[0].name}")
        version, vmlinuz, modules, builtin = _read_kernel_deb(debs[0])
        _check_module_order(modules, builtin)
        applets = _busybox_applets(busybox)
        initramfs = build_initramfs(busybox.read_bytes(), applets, version, modules,
                                    INIT_SCRIPT.read_bytes())
    _write_atomic(cache / KERNEL_NAME, vmlinuz)
    _write_atomic(cache / INITRAMFS_NAME, initramfs)
    stamp = {**_wanted_stamp(), "kernel_package": package, "kernel_version": version,
             "sizes": {KERNEL_NAME: len(vmlinuz), INITRAMFS_NAME: len(initramfs)}}
    _write_atomic(cache / STAMP_NAME, (json.dumps(stamp, indent=1) + "\n").encode())
    log(f"guest: built {cache} (kernel {version}, vmlinuz {len(vmlinuz) >> 10} KiB, "
        f"initramfs {len(initramfs) >> 10} KiB)")
    return _image(cache, stamp)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_busybox(path: Path) -> Path:
    """``path`` if it is a static x86-64 ELF (busybox-static), else :class:`ImageError`."""
    try:
        head = path.read_bytes()[:1 << 16]
    except OSError as exc:
        raise ImageError(f"{path} missing ({exc.strerror}): apt-get install busybox-static") \
            from None
    if not is_static_elf64(head):
        raise ImageError(f"{path} is not a static x86-64 busybox: apt-get install busybox-static")
    return path


def is_static_elf64(data: bytes) -> bool:
    """True for a little-endian x86-64 ELF with no ``PT_INTERP`` (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    machine, = struct.unpack_from("<H", data, 18)
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if machine != 62 or phoff + phentsize * phnum > len(data):
        return False
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def _busybox_applets(busybox: Path) -> list[str]:
    proc = _run([str(busybox), "--list"], f"{busybox} --list")
    applets = sorted({name for name in proc.stdout.split() if re.fullmatch(r"[\w.\[-]+", name)})
    missing = {"sh", "insmod", "ip", "mount", "base64", "timeout", "poweroff"} - set(applets)
    if missing:
        raise ImageError(f"{busybox} lacks applets the init needs: {' '.join(sorted(missing))}")
    return applets


_MODULE_RE = re.compile(r"(?:^|/)lib/modules/([^/]+)/kernel/(?:.*/)?([^/]+)\.ko(\.xz|\.gz)?$")
_VMLINUZ_RE = re.compile(r"(?:^|/)boot/vmlinuz-([^/]+)$")
_BUILTIN_RE = re.compile(r"(?:^|/)lib/modules/([^/]+)/modules\.builtin$")


def _read_kernel_deb(deb: Path) -> tuple[str, bytes, dict[str, bytes], set[str]]:
    """(kernel release, vmlinuz, {module name: .ko bytes} for :data:`MODULES`, built-in names).

    Streams ``dpkg-deb --fsys-tarfile`` and keeps only the members we need (nothing of the
    package is written to disk).
    """
    what = f"dpkg-deb --fsys-tarfile {deb.name}"
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImageError(f"{what} failed: dpkg-deb not found") from None
    vmlinuz: dict[str, bytes] = {}
    modules: dict[str, bytes] = {}
    builtin: set[str] = set()
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if (found := _VMLINUZ_RE.search(member.name)):
                    vmlinuz[found.group(1)] = tar.extractfile(member).read()
                elif (found := _MODULE_RE.search(member.name)) and found.group(2) in MODULES:
                    modules[found.group(2)] = _decompress(tar.extractfile(member).read(),
                                                          found.group(3), member.name)
                elif _BUILTIN_RE.search(member.name):
                    text = tar.extractfile(member).read().decode()
                    builtin = {Path(line).name.removesuffix(".ko") for line in text.split()}
    except tarfile.TarError as exc:
        raise ImageError(f"{what} failed: {exc}") from None
    finally:
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait()
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {_last_line(stderr)}")
    if len(vmlinuz) != 1:
        raise ImageError(f"{deb.name} holds {len(vmlinuz)} boot/vmlinuz-* files, expected one")
    version, kernel = vmlinuz.popitem()
    missing = [name for name in MODULES if name not in modules and name not in builtin]
    if missing:
        raise ImageError(f"{deb.name} lacks the modules {' '.join(missing)}")
    return version, kernel, modules, builtin


def _decompress(data: bytes, suffix: str | None, name: str) -> bytes:
    try:
        if suffix == ".xz":
            return lzma.decompress(data)
        if suffix == ".gz":
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError) as exc:
        raise ImageError(f"decompressing {name} failed: {exc}") from None
    return data


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` section."""
    found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [name for name in found.group(1).decode().split(",") if name] if found else []


def _check_module_order(modules: dict[str, bytes], builtin: set[str]) -> None:
    loaded = set(builtin)
    for name in MODULES:
        if name in modules:
            late = [dep for dep in module_depends(modules[name]) if dep not in loaded]
            if late:
                raise ImageError(f"module {name} depends on {','.join(late)}, not loaded before "
                                 f"it: fix MODULES in {Path(__file__).name}")
        loaded.add(name)


# --- the initramfs --------------------------------------------------------------------------


def build_initramfs(busybox: bytes, applets: Iterable[str], kernel_version: str,
                    modules: dict[str, bytes], init: bytes) -> bytes:
    """The gzip-compressed newc cpio of the guest (deterministic: same input, same bytes).

    ``modules`` maps module names to ``.ko`` bytes; those missing from it (built into the
    kernel) are left out of ``/etc/offcard/modules``.
    """
    cpio = NewcWriter()
    for path in ("bin", "dev", "etc", "etc/offcard", "lib", "lib/modules", "proc", "sys", "tmp",
                 "run", "root", "usr", "mnt"):
        cpio.add_dir(path)
    cpio.add_node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    cpio.add_node("dev/null", stat.S_IFCHR | 0o666, 1, 3)
    cpio.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "busybox":
            cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_symlink("sbin", "bin")
    cpio.add_symlink("usr/bin", "../bin")
    cpio.add_symlink("usr/sbin", "../bin")
    order = [name for name in MODULES if name in modules]
    for name in order:
        cpio.add_file(f"lib/modules/{name}.ko", modules[name], 0o644)
    cpio.add_file("etc/offcard/modules", "".join(f"{name}\n" for name in order).encode(), 0o644)
    cpio.add_file("etc/offcard/kernel", f"{kernel_version}\n".encode(), 0o644)
    cpio.add_file("init", init, 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


class NewcWriter:
    """A writer of ``newc`` cpio archives (the initramfs format: ``070701`` headers, names
    and data padded to 4 bytes, ``TRAILER!!!`` last). Paths are relative (no leading ``/``);
    owner root, mtime 0, inode numbers from 1 in order of addition."""

    def __init__(self):
        self._out = bytearray()
        self._ino = 0
        self._done = False

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self._done:
            raise ValueError("cpio archive already finished")
        if name.startswith("/") or not name:
            raise ValueError(f"cpio path must be relative: {name!r}")
        self._ino += 1
        raw_name = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(raw_name), 0)
        self._out += b"070701" + b"".join(b"%08X" % value for value in fields) + raw_name
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_node(self, name: str, mode: int, major: int, minor: int) -> None:
        """A device node: ``mode`` includes ``stat.S_IFCHR`` or ``stat.S_IFBLK``."""
        self._entry(name, mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer (the writer is then closed)."""
        self._entry("TRAILER!!!", 0)
        self._done = True
        return bytes(self._out)


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc cpio (uncompressed) up to its trailer; the trailer is not returned."""
    entries, pos = [], 0
    while True:
        if archive[pos:pos + 6] != b"070701":
            raise ValueError(f"bad newc magic at offset {pos}")
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        pos += 110
        name = archive[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        data = archive[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, data, rdev))
