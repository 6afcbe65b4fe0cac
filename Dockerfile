# The one Kanal image: `kanal operator`, `kanal dataplane` (ingress) and the injected
# sidecar all run from it. Build from the repository root:
#   docker build -t kanal:dev .
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# mypyc compiles the dataplane's hot modules into the wheel (setup.py): a C compiler
# is needed here only, not in the image that runs it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY kanal/ kanal/
COPY operator/ operator/
COPY dataplane/ dataplane/
COPY contract/ contract/
COPY commands/ commands/
RUN pip wheel --wheel-dir /wheels '.[operator]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'kanal[operator]' \
 && groupadd --system --gid 10001 kanal \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/kanal --create-home \
      --shell /usr/sbin/nologin kanal
USER 10001:10001
WORKDIR /var/lib/kanal
# ingress HTTP, HTTPS, admin; operator config; webhooks; sidecar listen, forward, admin
EXPOSE 8080 8443 9901 9000 9443 15001 15002 15021
ENTRYPOINT ["kanal"]
CMD ["--help"]
