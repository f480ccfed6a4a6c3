# image-result-worker: reads image tasks from Redis, writes JPEGs and results.json.
#
#   docker build -t image-result-worker .
#   docker run -d --name irw --ipc=host --stop-timeout 60 \
#     -v irw-output:/app/output -e REDIS_URL=redis://redis:6379 image-result-worker
#
# Shared memory. Tasks name POSIX segments in /dev/shm, and every container gets a
# private /dev/shm by default, where the producers' segments do not exist. Pick one:
#   --ipc=host                 use the host's /dev/shm (producers on the host or also
#                              run with --ipc=host);
#   --ipc=container:PRODUCER   join the IPC namespace of a producer container started
#                              with --ipc=shareable (compose: ipc: "service:producer");
#   --shm-size=1g              sizes /dev/shm of the container that owns the namespace
#                              (the shareable producer; it does not apply with host or
#                              container:NAME). Docker's 64 MB default holds ~20 frames
#                              of 1024x1024x3, and a full /dev/shm stops the producers.
# Segments are created mode 0600 by the producer's uid: run both as the same uid
# (this image runs as 10001; override with --user) or set UNLINK_SHM=false.
#
# Stopping. `docker stop` sends SIGTERM, then SIGKILL after 10 s unless told otherwise.
# The supervisor drains for up to SHUTDOWN_GRACE (30 s) and then flushes the ledger,
# so give it longer: --stop-timeout 60 (compose: stop_grace_period: 60s), or tasks in
# flight are killed and redelivered (never lost, but the work is done twice).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTPUT_DIR=/app/output/translated

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin worker \
    && mkdir -p /app/output/translated \
    && chown -R worker:worker /app/output

COPY supervisor.py ./
COPY workers/ ./workers/
COPY shared/ ./shared/
# Operator commands (status, check for the HEALTHCHECK, dead), imported on demand.
COPY control/ ./control/
# The producer client: the pool imports its protocol (queue keys, message limits),
# and `python -m image_result_client enqueue` runs from this image too.
COPY image_result_client/ ./image_result_client/

# A named volume mounted here starts as a copy of this directory, owned by the worker.
VOLUME /app/output
USER 10001:10001

# Exec form: the supervisor is PID 1 and receives SIGTERM itself (it installs its own
# handlers, so PID 1's default of ignoring signals does not apply), then drains.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["python", "supervisor.py", "check"]
ENTRYPOINT ["python", "supervisor.py"]
