# syntax=docker/dockerfile:1
# One image for the recall service (default command) and the trainer (`python -m models ...`):
#   docker build -t tower-recall .
#   docker run --rm -v artifacts:/artifacts tower-recall \
#       python -m models train --data synthetic --out /artifacts
#   docker run --rm -p 8000:8000 -v artifacts:/artifacts:ro tower-recall

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The versions the test suite passed with (constraints.txt, `make lock`). CPU-only PyTorch
# first, at the locked version: the project's requirement is then already met and pip never
# pulls a multi-GB CUDA build.
COPY constraints.txt ./
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)+cpu"
COPY pyproject.toml README.md ./
COPY models ./models
COPY app ./app
RUN pip install --constraint constraints.txt .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 recall \
    && mkdir -p /artifacts /index-cache \
    && chown recall:recall /artifacts /index-cache
COPY --from=build /opt/venv /opt/venv
# One math thread per process: on a busy box, OpenMP threads spin-waiting for each other make
# small models many times slower. `python -m app` sets its own (TORCH_THREADS); give the
# trainer more for big data: `docker compose run -e OMP_NUM_THREADS=8 --rm trainer`.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    MODEL_DIR=/artifacts \
    HOST=0.0.0.0 \
    PORT=8000
USER 10001
WORKDIR /home/recall
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health/ready\", timeout=2)"]
CMD ["python", "-m", "app"]
