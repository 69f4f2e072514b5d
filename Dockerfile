# One Dockerfile, three images that share their base layers:
#   - the default (last) stage: train, evaluate and infer (torch; no HTTP stack: serve is the slim image's);
#   - target `serve`: the slim serving image, with onnxruntime and numpy instead of torch;
#   - target `export`: the default image plus torch's ONNX exporter (onnx, onnxscript) and onnxruntime,
#     for `mnist export`.
#
# Online (the default): Docker Hub's python:3.11-slim, CPU torch from PyTorch's CPU wheel index and
# the rest from PyPI. Offline: scripts/offline-prep.sh writes docker-compose.override.yml, which sets
# BASE_IMAGE to a local Debian image and PIP_INSTALL_OPTS to the local wheelhouse/.
ARG BASE_IMAGE=python:3.11-slim
# --no-deps: each requirements file is a complete, pinned list; they leave out dependencies the
# services never load. A CUDA build drops --no-deps (see docker-compose.yml).
ARG PIP_INSTALL_OPTS="--no-deps --extra-index-url https://download.pytorch.org/whl/cpu"

# --- tools: the wheels, binutils and an empty venv, which every dependency stage starts from ------
FROM ${BASE_IMAGE} AS tools
# empty but for a README unless scripts/offline-prep.sh filled it (wheels, and binutils' .debs)
COPY wheelhouse/ /wheels/
# binutils for `strip`, in the build stages only (the images copy nothing but venvs): offline
# from the wheelhouse's .debs, online from the base image's Debian sources
RUN if ls /wheels/debs/*.deb >/dev/null 2>&1; then dpkg -i /wheels/debs/*.deb >/dev/null; \
    else apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
      && rm -rf /var/lib/apt/lists/*; fi \
 && strip --version >/dev/null
RUN python3 -m venv /opt/venv

# --- deps: the default image's venv, with torch, trimmed -----------------------------------------
FROM tools AS deps
ARG PIP_INSTALL_OPTS
COPY requirements-docker.txt docker/slim_venv.py /tmp/build/
# slim_venv.py drops torch's tests, headers and tools and sympy's and mpmath's tests, strips torch's
# libraries (binutils), and fails the build unless torch still trains a step (bench/image_bench.py
# measures the images).
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_INSTALL_OPTS \
      -r /tmp/build/requirements-docker.txt \
 && /opt/venv/bin/python /tmp/build/slim_venv.py \
 && rm -rf /tmp/build

# --- package: mnist itself, installed under a prefix that each image copies into its venv --------
FROM deps AS package
COPY pyproject.toml README.md /tmp/src/
COPY src/ /tmp/src/src/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
      --prefix /opt/package /tmp/src

# --- venv: the dependencies without pip (which the services never run) ------------------------
FROM deps AS venv
RUN rm -rf /opt/venv/bin/pip* /opt/venv/lib/python3*/site-packages/pip /opt/venv/lib/python3*/site-packages/pip-*

# --- serve-venv: the slim image's venv: onnxruntime, numpy, Pillow, the HTTP stack; no torch ------
FROM tools AS serve-venv
ARG PIP_INSTALL_OPTS
COPY requirements-serve.txt requirements-docker.txt docker/slim_venv.py /tmp/build/
# slim_venv.py drops onnxruntime's and numpy's tooling and tests and fails the build unless
# onnxruntime runs a session, Pillow decodes images and torch does not import; then pip and
# setuptools go (the venv's own, which nothing here runs).
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_INSTALL_OPTS \
      -r /tmp/build/requirements-serve.txt \
 && /opt/venv/bin/python /tmp/build/slim_venv.py --no-torch \
 && rm -rf /tmp/build /opt/venv/bin/pip* \
 && cd /opt/venv/lib/python3*/site-packages \
 && rm -rf pip pip-* setuptools setuptools-* pkg_resources _distutils_hack distutils-precedence.pth

# --- export-additions: torch's ONNX exporter and onnxruntime, under a prefix of their own -------
FROM deps AS export-additions
ARG PIP_INSTALL_OPTS
COPY requirements-export.txt requirements-serve.txt requirements-docker.txt docker/slim_venv.py /tmp/build/
# onnx, onnxscript and what they and torch.export import (requirements-export.txt), onnxruntime and numpy
# at the serve image's versions; slim_venv.py checks that torch exports a network that onnxruntime runs
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_INSTALL_OPTS \
      --prefix /opt/export -r /tmp/build/requirements-export.txt \
 && /opt/venv/bin/python /tmp/build/slim_venv.py --site /opt/export/lib/python3*/site-packages \
 && rm -rf /tmp/build

# --- base: what every image runs with -------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
# uid 1000 writes the volume. /opt/mount belongs to it, so a brand-new named volume mounted there
# is seeded with that ownership.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh mnist \
 && mkdir -p /opt/mount \
 && chown mnist:mnist /opt/mount
# numpy is not in the default image (its size: bench/image_bench.py --variants; nothing there turns
# tensors into numpy arrays): silence the warning torch prints about that at every import.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONWARNINGS="ignore:Failed to initialize NumPy" \
    MNIST_ROOT=/opt/mount \
    MNIST_HOST=0.0.0.0

# --- serve: the slim image (no torch) that the Compose service serve runs --------------------------
FROM base AS serve
COPY --from=serve-venv /opt/venv /opt/venv
COPY --from=package /opt/package/ /opt/venv/
USER mnist
WORKDIR /opt/mount
EXPOSE 8000
CMD ["mnist", "serve"]

# --- runtime: train, evaluate, infer (and predict) ------------------------------------------------
FROM base AS runtime
COPY --from=venv /opt/venv /opt/venv
# the package last: a source edit rebuilds only this small layer, never the venv above
COPY --from=package /opt/package/ /opt/venv/
USER mnist
WORKDIR /opt/mount
CMD ["mnist", "--help"]

# --- export: the default image plus torch's ONNX exporter and onnxruntime, for `mnist export` -------
FROM runtime AS export
COPY --from=export-additions /opt/export/ /opt/venv/
CMD ["mnist", "export", "--follow"]

# --- the default image, last so that a plain build makes it: train, evaluate, infer ---------------
FROM runtime
