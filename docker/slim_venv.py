"""Shrink the image's venv: drop what torch never loads at run time, strip symbol tables.

Run by the Dockerfile's build stage with the venv's own python, after the dependencies are installed:
    python slim_venv.py
It removes torch/test, torch/include and torch/bin (all but torch_shm_manager, which `import torch`
needs) and the test suites of sympy and mpmath, then runs binutils' `strip --strip-unneeded` on
torch's shared libraries (binutils lives in the build stage only). Prints what it saved.
Then it checks that torch still imports and trains a step: a broken image fails its build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

KEEP_IN_BIN = {"torch_shm_manager"}
# packages whose `tests` folders nothing imports at run time
TEST_SUITES = ("sympy", "mpmath")


def strip(libraries: list) -> None:
    """binutils' strip: the symbol tables the dynamic loader never reads."""
    subprocess.run(["strip", "--strip-unneeded", *map(str, libraries)], check=True)


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
    unstripped = tree_size(torch_dir)
    strip([p for p in sorted(torch_dir.rglob("*.so*")) if p.is_file() and not p.is_symlink()])
    stripped = unstripped - tree_size(torch_dir)
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
    return subprocess.run([sys.executable, "-c", SMOKE]).returncode


if __name__ == "__main__":
    sys.exit(main())
