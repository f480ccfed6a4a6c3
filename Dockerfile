# image-result-worker: reads image tasks from Redis, writes JPEGs and results.json.
#
# Run it in the producers' IPC namespace so /dev/shm is shared with them, and give it
# longer than SHUTDOWN_GRACE (30 s) to drain before Docker sends SIGKILL:
#   docker run --ipc=host --stop-timeout 60 -v results:/app/output \
#     -e REDIS_URL=redis://redis:6379 image-result-worker
# (or --ipc=container:PRODUCER). Segments are created with mode 0600 by the producer,
# so run as its uid (--user UID:GID) unless the producer makes them readable to us.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

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

ENV OUTPUT_DIR=/app/output/translated
VOLUME /app/output
USER 10001:10001

# The supervisor drains its workers on SIGTERM; exec form makes it PID 1 so it gets it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "supervisor.py"]
