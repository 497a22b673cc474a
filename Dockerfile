# ITAP Stream consumer / simulator image. Build: docker build -t itap-stream .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ITAP_CONFIG=/app/configs/itap.yaml \
    ITAP_DB_URL=sqlite:////data/itap.db \
    ITAP_MODEL_PATH=/models/current.joblib \
    ITAP_HTTP_ADDR=0.0.0.0:9108

WORKDIR /app
COPY pyproject.toml README.md ./
COPY itap_stream ./itap_stream
COPY simulator ./simulator
COPY configs ./configs
# the postgres extra: the PostgreSQL driver, for ITAP_DB_URL=postgresql://...
RUN pip install --no-cache-dir ".[postgres]" \
    && useradd --system --uid 10001 --home /app itap \
    && mkdir -p /data /models && chown itap /data /models

USER itap
VOLUME ["/data", "/models"]
EXPOSE 9108
# /healthz: 200 while the consumer works, 503 when its store, processing loop or intake is stuck
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"
ENTRYPOINT ["itap"]
CMD ["run"]
