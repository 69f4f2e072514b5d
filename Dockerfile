# One image for the four services (train, evaluate, infer, serve): they share every layer.
#
# Online (the default): Docker Hub's python:3.11-slim, CPU torch from PyTorch's CPU wheel index and
# the rest from PyPI. Offline: scripts/offline-prep.sh writes docker-compose.override.yml, which sets
# BASE_IMAGE to a local Debian image and PIP_INSTALL_OPTS to the local wheelhouse/.
ARG BASE_IMAGE=python:3.11-slim

# --- deps: a venv with the pinned run-time dependencies, trimmed ------------------------------
FROM ${BASE_IMAGE} AS deps
# --no-deps: requirements-docker.txt is the complete, pinned list; it leaves out torch dependencies
# the services never load. A CUDA build drops --no-deps (see docker-compose.yml).
ARG PIP_INSTALL_OPTS="--no-deps --extra-index-url https://download.pytorch.org/whl/cpu"
# empty but for a README unless scripts/offline-prep.sh filled it (wheels, and binutils' .debs)
COPY wheelhouse/ /wheels/
# binutils for `strip`, in this stage only (the runtime stage copies nothing but the venv): offline
# from the wheelhouse's .debs, online from the base image's Debian sources
RUN if ls /wheels/debs/*.deb >/dev/null 2>&1; then dpkg -i /wheels/debs/*.deb >/dev/null; \
    else apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
      && rm -rf /var/lib/apt/lists/*; fi \
 && strip --version >/dev/null
RUN python3 -m venv /opt/venv
COPY requirements-docker.txt docker/slim_venv.py /tmp/build/
# slim_venv.py drops torch's tests, headers and tools and sympy's and mpmath's tests, strips torch's
# libraries (binutils), and fails the build unless torch still trains a step (bench/image_bench.py
# measures what each saves).
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_INSTALL_OPTS \
      -r /tmp/build/requirements-docker.txt \
 && /opt/venv/bin/python /tmp/build/slim_venv.py \
 && rm -rf /tmp/build

# --- package: mnist itself, installed under a prefix that the runtime copies into the venv ------
FROM deps AS package
COPY pyproject.toml README.md /tmp/src/
COPY src/ /tmp/src/src/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
      --prefix /opt/package /tmp/src

# --- venv: the dependencies without pip (16 MB the services never run) ------------------------
FROM deps AS venv
RUN rm -rf /opt/venv/bin/pip* /opt/venv/lib/python3*/site-packages/pip /opt/venv/lib/python3*/site-packages/pip-*

# --- runtime ------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# uid 1000 writes the volume. /opt/mount belongs to it, so a brand-new named volume mounted there
# is seeded with that ownership.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh mnist \
 && mkdir -p /opt/mount \
 && chown mnist:mnist /opt/mount
# numpy is not installed (its size: bench/image_bench.py --variants; nothing here turns tensors
# into numpy arrays): silence the warning torch prints about that at every import.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONWARNINGS="ignore:Failed to initialize NumPy" \
    MNIST_ROOT=/opt/mount \
    MNIST_HOST=0.0.0.0
COPY --from=venv /opt/venv /opt/venv
# the package last: a source edit rebuilds only this small layer, never the venv above
COPY --from=package /opt/package/ /opt/venv/
USER mnist
WORKDIR /opt/mount
# mnist serve (MNIST_HOST above: reachable through the published port)
EXPOSE 8000
CMD ["mnist", "--help"]
