# syntax=docker/dockerfile:1
#
# ChatReID image: one image, every process (`chatreid init|ingest|embed|serve|train|...`, and
# Ray nodes via `--entrypoint ray`; KubeRay runs `ray start` in it by itself).
#
#   docker build -t chatreid:0.1.0 .                             # CPU (default)
#   docker build -t chatreid:0.1.0-cuda --build-arg VARIANT=cuda .  # CUDA torch + faiss-gpu
#
# The cuda variant needs no CUDA base image: the torch and faiss-gpu wheels carry their CUDA
# runtime libraries; the host supplies only the driver (NVIDIA container toolkit).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# cpu | cuda
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Where the CPU-only torch wheel comes from; PyPI's default Linux wheel is the CUDA build.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Torch first and on its own: the largest layer, and the one that decides the variant.
RUN set -eu; \
    case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be 'cpu' or 'cuda', got '$VARIANT'" >&2; exit 1 ;; \
    esac

# Dependencies from pyproject.toml only, so editing the source does not reinstall them.
COPY pyproject.toml /src/pyproject.toml
RUN python - "$VARIANT" > /tmp/requirements.txt <<'EOF'
import sys
import tomllib

project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]
deps = list(project["dependencies"])
if sys.argv[1] == "cuda":
    deps += project["optional-dependencies"]["gpu"]
print("\n".join(deps))
EOF
RUN pip install -r /tmp/requirements.txt
COPY requirements-nodeps.txt /src/requirements-nodeps.txt
RUN pip install --no-deps -r /src/requirements-nodeps.txt
COPY requirements-torch-ext.txt /src/requirements-torch-ext.txt
RUN pip install --no-build-isolation -r /src/requirements-torch-ext.txt

# The project itself (--no-deps: everything it needs is already in the layer above).
COPY . /src
RUN pip install --no-deps /src

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="chatreid" \
      org.opencontainers.image.description="Interactive cross-camera person re-identification" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.chatreid.variant="${VARIANT}"

RUN groupadd --system --gid 10001 chatreid \
    && useradd --system --uid 10001 --gid chatreid --create-home --home-dir /home/chatreid \
       --shell /usr/sbin/nologin chatreid

COPY --from=build /opt/venv /opt/venv

# Containers are reached over the network: the ingestor and the retrieval API listen on all
# interfaces, not loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATREID_INGESTOR__HTTP_HOST=0.0.0.0 \
    CHATREID_SERVE__HTTP_HOST=0.0.0.0

# Login shells (`bash -l`, as KubeRay < 1.4 starts Ray) reset PATH in /etc/profile; put the
# venv back so `ray` and `chatreid` resolve there too.
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/chatreid-venv.sh

# Fails the build, not the first deployment, if the install is broken.
RUN chatreid --help > /dev/null

USER 10001:10001
WORKDIR /home/chatreid
# ingestor, retrieval API (Serve), Ray GCS, Ray dashboard, Ray client
EXPOSE 8070 8000 6379 8265 10001

ENTRYPOINT ["chatreid"]
CMD ["--help"]
