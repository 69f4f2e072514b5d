"""Shrink the image's venv: drop what torch never loads at run time, strip symbol tables.

Run by the Dockerfile with the venv's own python, after the dependencies are installed:
    python slim_venv.py
It removes torch/test, torch/include and torch/bin (all but torch_shm_manager, which `import torch`
needs) and the test suites of sympy and mpmath, then strips the static symbol tables from torch's
shared libraries, as `strip --strip-unneeded` would (the images have no binutils). Prints what it
saved.
Then it checks that torch still imports and trains a step: a broken image fails its build.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import sysconfig
from pathlib import Path

# ELF64 little-endian layouts: header after e_ident, section header
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHT_NULL, _SHT_SYMTAB, _SHT_STRTAB, _SHT_RELA, _SHT_NOBITS, _SHT_REL = 0, 2, 3, 4, 8, 9
_SHF_ALLOC, _SHF_INFO_LINK = 0x2, 0x40
_SHN_LORESERVE = 0xFF00

KEEP_IN_BIN = {"torch_shm_manager"}
# packages whose `tests` folders nothing imports at run time
TEST_SUITES = ("sympy", "mpmath")


def strip_elf(path: Path) -> int:
    """Drop the static symbol table, its string table and debug sections from an ELF64 LE file.

    Works in place and only where those sections sit after everything the loader maps (which is
    how linkers lay them out); any other file is left untouched. Returns the bytes saved.
    """
    with open(path, "r+b") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            return 0
        (e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
         e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = _EHDR.unpack(f.read(_EHDR.size))
        if e_shoff == 0 or e_shnum == 0 or e_shnum >= _SHN_LORESERVE or e_shstrndx >= _SHN_LORESERVE:
            return 0
        f.seek(e_shoff)
        sections = [list(_SHDR.unpack(f.read(e_shentsize)[:_SHDR.size])) for _ in range(e_shnum)]
        f.seek(e_phoff)
        segments = [_PHDR.unpack(f.read(e_phentsize)[:_PHDR.size]) for _ in range(e_phnum)]
        name_sec = sections[e_shstrndx]
        f.seek(name_sec[4])
        names = f.read(name_sec[5])

        def name(sec):
            return names[sec[0]:names.index(b"\0", sec[0])].decode("ascii", "replace")

        drop = set()
        for i, sec in enumerate(sections):
            if sec[2] & _SHF_ALLOC:
                continue
            if sec[1] == _SHT_SYMTAB:
                drop.add(i)
                if sections[sec[6]][1] == _SHT_STRTAB and sec[6] != e_shstrndx:
                    drop.add(sec[6])
            elif name(sec).startswith((".debug", ".zdebug")):
                drop.add(i)
        if not drop:
            return 0
        # indices of sections the loader maps must not move: .dynsym refers to them by number
        if min(drop) < max((i for i, s in enumerate(sections) if s[2] & _SHF_ALLOC), default=0):
            return 0
        if any(sections[i][6] in drop for i in range(e_shnum) if i not in drop):
            return 0  # a kept section links to a dropped one

        def end(sec):
            return sec[4] + (0 if sec[1] in (_SHT_NOBITS, _SHT_NULL) else sec[5])

        keep_end = max([e_ehsize, e_phoff + e_phnum * e_phentsize]
                       + [p[2] + p[5] for p in segments]
                       + [end(s) for i, s in enumerate(sections) if i not in drop and i != e_shstrndx])
        if min(sections[i][4] for i in drop) < keep_end:
            return 0  # the dropped bytes are not at the tail: nothing to gain by truncating

        old_size = os.fstat(f.fileno()).st_size
        renumber = {}
        kept = []
        for i, sec in enumerate(sections):
            if i not in drop:
                renumber[i] = len(kept)
                kept.append(sec)
        for sec in kept:
            sec[6] = renumber.get(sec[6], sec[6]) if sec[6] else 0
            if sec[1] in (_SHT_REL, _SHT_RELA) or sec[2] & _SHF_INFO_LINK:
                sec[7] = renumber.get(sec[7], sec[7]) if sec[7] else 0
        pos = keep_end
        if end(name_sec) > keep_end:  # move the section-name table down to the new tail
            name_sec[4] = pos
            pos += len(names)
        sh_off = (pos + 7) & ~7
        f.seek(keep_end)
        f.truncate()
        if name_sec[4] == keep_end:
            f.write(names)
        f.write(b"\0" * (sh_off - f.tell()))
        for sec in kept:
            f.write(_SHDR.pack(*sec).ljust(e_shentsize, b"\0"))
        f.seek(16)
        f.write(_EHDR.pack(e_type, e_machine, e_version, e_entry, e_phoff, sh_off, e_flags, e_ehsize,
                           e_phentsize, e_phnum, e_shentsize, len(kept), renumber[e_shstrndx]))
        return old_size - os.fstat(f.fileno()).st_size


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def slim_torch(torch_dir: Path) -> None:
    before = tree_size(torch_dir)
    for sub in ("test", "include"):
        shutil.rmtree(torch_dir / sub, ignore_errors=True)
    for entry in (torch_dir / "bin").iterdir():
        if entry.name not in KEEP_IN_BIN:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    removed = before - tree_size(torch_dir)
    stripped = sum(strip_elf(p) for p in sorted(torch_dir.rglob("*.so*")) if p.is_file() and not p.is_symlink())
    print(f"slim_venv: torch {before / 1e6:.0f} MB -> {tree_size(torch_dir) / 1e6:.0f} MB "
          f"(removed tests/headers/tools {removed / 1e6:.0f} MB, stripped symbols {stripped / 1e6:.0f} MB)", flush=True)


SMOKE = """
import warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F
model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 26 * 26, 10))
opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
opt.zero_grad(); loss.backward(); opt.step(); sched.step()
import pkg_resources
print("slim_venv: torch", pkg_resources.get_distribution("torch").version, "imports and trains a step")
try:
    import io
    from PIL import Image
except ImportError:
    pass  # an image without the serving stack
else:
    for kind in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        buffer = io.BytesIO()
        Image.new("L", (8, 8), 255).save(buffer, kind)
        Image.open(io.BytesIO(buffer.getvalue())).load()
    print("slim_venv: pillow reads PNG, JPEG, WebP, BMP and GIF")
"""


def drop_test_suites(site: Path) -> None:
    for package in TEST_SUITES:
        before = tree_size(site / package)
        for tests in sorted((site / package).rglob("tests")):
            if tests.is_dir():
                shutil.rmtree(tests)
        print(f"slim_venv: {package} {before / 1e6:.0f} MB -> {tree_size(site / package) / 1e6:.0f} MB "
              f"(removed its tests)", flush=True)


def drop_pillow_avif(site: Path) -> None:
    """Pillow's AVIF codec (5 MB, libavif with its encoders): nobody draws digits in AVIF. Pillow
    skips a plugin whose module does not import, and still reads PNG, JPEG, WebP, BMP, GIF."""
    gone = [*(site / "PIL").glob("_avif.*.so"), *(site / "pillow.libs").glob("libavif-*.so*")]
    saved = sum(path.stat().st_size for path in gone)
    for path in gone:
        path.unlink()
    print(f"slim_venv: pillow without its AVIF codec (-{saved / 1e6:.0f} MB)", flush=True)


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    slim_torch(site / "torch")
    drop_test_suites(site)
    if (site / "PIL").is_dir():
        drop_pillow_avif(site)
    import subprocess

    return subprocess.run([sys.executable, "-c", SMOKE]).returncode


if __name__ == "__main__":
    sys.exit(main())
