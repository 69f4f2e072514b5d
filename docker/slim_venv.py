"""Shrink an image's venv: drop what the services never load at run time, strip symbol tables.

Run by the Dockerfile's dependency stages with the venv's own python, after pip installed them:
    python slim_venv.py [--site DIR] [--no-torch]
DIR (default: this venv's site-packages) is where pip put the packages to slim; the export image's
additions live under a prefix of their own. Each rule applies where its package is installed:
  - torch: torch/test, torch/include, torch/bin but torch_shm_manager (which `import torch` needs),
    then binutils' `strip --strip-unneeded` on its shared libraries (binutils lives in the build
    stages only);
  - sympy, mpmath and networkx: their test suites;
  - onnx: onnx/backend/test (the backend test suite's models and data; the export image only);
  - ml_dtypes: strip on its extension module (the export image only);
  - Pillow: its AVIF codec;
  - onnxruntime: libonnxruntime.so (the C API's library; the Python module carries its own copy of
    the runtime), and tools, transformers, quantization and backend (model tooling that needs the
    onnx package, protobuf or sympy, none of them installed);
  - numpy: its test suites and test-only modules, f2py, distutils, C headers and type stubs. Its
    libraries stay unstripped: strip breaks the ones auditwheel patched into numpy.libs (the
    loader refuses them), and numpy's own would give 1 MB.
Prints what each saved (bench/image_bench.py measures the images). Then it checks that what is left
works, so a broken image fails its build: torch trains a step, onnxruntime runs a session on numpy
arrays, Pillow decodes PNG, JPEG, WebP, BMP and GIF, torch's ONNX exporter (where onnxscript is installed)
exports a small network that onnxruntime runs; with --no-torch, that `import torch` fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

KEEP_IN_BIN = {"torch_shm_manager"}
# packages whose `tests` folders nothing imports at run time
TEST_SUITES = ("sympy", "mpmath", "networkx")
ONNXRUNTIME_TOOLING = ("tools", "transformers", "quantization", "backend")
# numpy's folders that `import numpy` and array code never load: the Fortran wrapper generator, the
# deprecated build helpers, C headers and the static math library for building extensions
NUMPY_BUILD_TOOLING = ("f2py", "distutils", "_pyinstaller", "doc", "_core/include", "_core/lib")
# console scripts of the removed tooling
DROPPED_SCRIPTS = ("f2py", "onnxruntime_test")


def strip(libraries: list) -> None:
    """binutils' strip: the symbol tables the dynamic loader never reads."""
    subprocess.run(["strip", "--strip-unneeded", *map(str, libraries)], check=True)


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def libraries(folder: Path) -> list:
    return [p for p in sorted(folder.rglob("*.so*")) if p.is_file() and not p.is_symlink()]


def remove(paths) -> int:
    """Removes files and folders; the bytes they held."""
    saved = 0
    for path in paths:
        if path.is_symlink() or path.is_file():
            saved += 0 if path.is_symlink() else path.stat().st_size
            path.unlink()
        elif path.is_dir():
            saved += tree_size(path)
            shutil.rmtree(path)
    return saved


def report(name: str, before: int, after: int, what: str) -> None:
    print(f"slim_venv: {name} {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB ({what})", flush=True)


def slim_torch(torch_dir: Path) -> None:
    before = tree_size(torch_dir)
    for sub in ("test", "include"):
        shutil.rmtree(torch_dir / sub, ignore_errors=True)
    for entry in (torch_dir / "bin").iterdir():
        if entry.name not in KEEP_IN_BIN:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    removed = before - tree_size(torch_dir)
    unstripped = tree_size(torch_dir)
    strip(libraries(torch_dir))
    stripped = unstripped - tree_size(torch_dir)
    report("torch", before, tree_size(torch_dir),
           f"removed tests/headers/tools {removed / 1e6:.0f} MB, stripped symbols {stripped / 1e6:.0f} MB")


def drop_test_suites(site: Path) -> None:
    for package in TEST_SUITES:
        if not (site / package).is_dir():
            continue
        before = tree_size(site / package)
        for tests in sorted((site / package).rglob("tests")):
            if tests.is_dir():
                shutil.rmtree(tests)
        report(package, before, tree_size(site / package), "removed its tests")


def drop_pillow_avif(site: Path) -> None:
    """Pillow's AVIF codec (5 MB, libavif with its encoders): nobody draws digits in AVIF. Pillow
    skips a plugin whose module does not import, and still reads PNG, JPEG, WebP, BMP, GIF."""
    saved = remove([*(site / "PIL").glob("_avif.*.so"), *(site / "pillow.libs").glob("libavif-*.so*")])
    print(f"slim_venv: pillow without its AVIF codec (-{saved / 1e6:.0f} MB)", flush=True)


def slim_onnxruntime(site: Path) -> None:
    package = site / "onnxruntime"
    before = tree_size(package)
    library = remove(package.glob("capi/libonnxruntime.so*"))
    tooling = remove(package / sub for sub in ONNXRUNTIME_TOOLING)
    report("onnxruntime", before, tree_size(package),
           f"removed the C API library {library / 1e6:.0f} MB, model tooling {tooling / 1e6:.0f} MB")


def slim_exporter(site: Path) -> None:
    """What torch's ONNX exporter brings: onnx's backend test suite (models and data nothing here runs) and
    ml_dtypes' symbol tables (its extension module is all symbols but a tenth)."""
    before = tree_size(site / "onnx") + tree_size(site / "ml_dtypes")
    tests = remove([site / "onnx" / "backend" / "test"])
    unstripped = tree_size(site / "ml_dtypes")
    strip(libraries(site / "ml_dtypes"))
    stripped = unstripped - tree_size(site / "ml_dtypes")
    report("onnx and ml_dtypes", before, tree_size(site / "onnx") + tree_size(site / "ml_dtypes"),
           f"removed onnx's backend tests {tests / 1e6:.0f} MB, stripped ml_dtypes {stripped / 1e6:.0f} MB")


def slim_numpy(site: Path) -> None:
    package, libs = site / "numpy", site / "numpy.libs"
    before = tree_size(package) + tree_size(libs)
    tests = remove([*package.rglob("tests"), *package.glob("_core/_*_tests.*.so"), *package.glob("_core/_simd.*.so"),
                    *package.glob("conftest.py")])
    tooling = remove(package / sub for sub in NUMPY_BUILD_TOOLING)
    stubs = remove([*package.rglob("*.pyi"), *package.rglob("*.pxd")])
    report("numpy", before, tree_size(package) + tree_size(libs),
           f"removed tests {tests / 1e6:.0f} MB, build tooling {tooling / 1e6:.0f} MB, stubs {stubs / 1e6:.0f} MB")


TORCH_SMOKE = """
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
"""
NO_TORCH_SMOKE = """
try:
    import torch
except ImportError:
    print("slim_venv: no torch (import torch fails)")
else:
    raise SystemExit(f"slim_venv: torch imports from {torch.__file__}, yet this venv must have none")
"""
ONNX_SMOKE = """
import numpy as np
import onnxruntime
from onnxruntime.datasets import get_example
session = onnxruntime.InferenceSession(get_example("mul_1.onnx"), providers=["CPUExecutionProvider"])
x = np.arange(6, dtype=np.float32).reshape(3, 2)
(y,) = session.run(None, {"X": x})  # the example multiplies by its constant [[1, 2], [3, 4], [5, 6]]
assert np.array_equal(y, x * (x + 1)), y
print("slim_venv: onnxruntime", onnxruntime.__version__, "runs a session on numpy", np.__version__)
"""
EXPORT_SMOKE = """
import logging, warnings
warnings.simplefilter("ignore")
import numpy as np, onnxruntime, torch
logging.getLogger("torch").setLevel(logging.ERROR)  # (that torchvision is not installed; after import torch)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(2 * 26 * 26, 10)).eval()
program = torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), dynamo=True, verbose=False,
                            dynamic_shapes=({0: torch.export.Dim("batch")},))
session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
x = torch.rand(3, 1, 28, 28)
(y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
assert np.allclose(y, model(x).detach().numpy(), atol=1e-5), y
print("slim_venv: torch's ONNX exporter writes a model that onnxruntime runs as torch does")
"""
PILLOW_SMOKE = """
import io
from PIL import Image
for kind in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, kind)
    Image.open(io.BytesIO(buffer.getvalue())).load()
print("slim_venv: pillow reads PNG, JPEG, WebP, BMP and GIF")
"""


def smoke(site: Path, no_torch: bool) -> int:
    """Each check in a fresh interpreter, as a service imports them; `site` on the path."""
    checks = [NO_TORCH_SMOKE if no_torch else TORCH_SMOKE]
    checks += [ONNX_SMOKE] if (site / "onnxruntime").is_dir() else []
    checks += [EXPORT_SMOKE] if (site / "onnxscript").is_dir() else []
    checks += [PILLOW_SMOKE] if (site / "PIL").is_dir() else []
    env = dict(os.environ, PYTHONPATH=str(site))
    for check in checks:
        if subprocess.run([sys.executable, "-c", check], env=env).returncode != 0:
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                        help="the site-packages folder to slim (default: this venv's)")
    parser.add_argument("--no-torch", action="store_true", help="check that torch does not import")
    args = parser.parse_args()
    site = args.site
    if (site / "torch").is_dir():
        slim_torch(site / "torch")
    drop_test_suites(site)
    if (site / "PIL").is_dir():
        drop_pillow_avif(site)
    if (site / "onnxruntime").is_dir():
        slim_onnxruntime(site)
    if (site / "numpy").is_dir():
        slim_numpy(site)
    if (site / "onnx").is_dir():
        slim_exporter(site)
    bin_dir = site.parents[2] / "bin"  # <prefix>/lib/pythonX.Y/site-packages
    remove(bin_dir / name for name in DROPPED_SCRIPTS)
    return smoke(site, args.no_torch)


if __name__ == "__main__":
    sys.exit(main())
