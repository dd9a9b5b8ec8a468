# The Tandem operator image: `tandem operator run` with the `operator` extra (kopf, the Kubernetes
# client's configuration, aiohttp). No torch, no ray. Build from the repository root:
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/tandem-dev/tandem-operator:0.1.0 .
#
# BASE_IMAGE needs python3 (>= 3.11) with its venv module, or Debian's/Ubuntu's apt to install it.
# `tandem images build` passes a Debian 12 base made locally with debootstrap (docs/images.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Stage 0: the base with python3 and its venv module.
FROM ${BASE_IMAGE} AS python
USER root
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
'BASE_IMAGE has Python %d.%d; Tandem needs 3.11 or newer' % sys.version_info[:2])"

# Stage 1: the wheel of this tree and the exact requirement list of the extra. The final image gets
# neither the source tree nor the build backend, and its dependency layer is rebuilt only when the
# requirement list changes, not on every source edit.
FROM python AS wheel
ARG EXTRA=operator
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tandem ./tandem
RUN python3 -m venv /build \
 && /build/bin/pip wheel --quiet --no-deps --wheel-dir /dist . \
 && python3 -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" "$EXTRA" > /dist/requirements.txt

# Stage 2: a virtualenv in /opt/tandem owned by root, run by an unprivileged user. A current pip: the
# resolver of old ones (Debian 12's 23.0) backtracks for a long time over the workloads' requirements.
FROM python
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
RUN useradd --uid 65532 --user-group --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem \
 && python3 -m venv /opt/tandem \
 && /opt/tandem/bin/pip install --quiet --upgrade pip
COPY --from=wheel /dist/requirements.txt /opt/tandem/requirements.txt
# The wheels stay in a build cache (BuildKit's and buildah's `--mount=type=cache`), so a rebuild after a
# requirement change downloads only what is new, even behind a proxy that defeats pip's HTTP cache.
RUN --mount=type=cache,id=tandem-wheels,target=/var/cache/tandem-wheels \
    /opt/tandem/bin/pip wheel --progress-bar off --wheel-dir /var/cache/tandem-wheels \
      --find-links /var/cache/tandem-wheels --requirement /opt/tandem/requirements.txt \
 && /opt/tandem/bin/pip install --quiet --no-index --find-links /var/cache/tandem-wheels \
      --requirement /opt/tandem/requirements.txt
COPY --from=wheel /dist/*.whl /tmp/dist/
RUN /opt/tandem/bin/pip install --quiet --no-deps --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist

ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/tandem
# Numeric, so kubelet can verify `runAsNonRoot` (the chart runs it as 65532 too).
USER 65532:65532
WORKDIR /home/tandem
ENTRYPOINT ["tandem"]
CMD ["operator", "run"]
