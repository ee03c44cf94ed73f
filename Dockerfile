# The engine's image: the production install (`pip install .`), run as `billing serve` or
# `billing worker` by docker-compose.yml.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md worker.py ./
COPY billing ./billing
COPY activities ./activities
COPY workflows ./workflows
COPY starter ./starter
RUN pip install --no-cache-dir . && useradd --system billing
USER billing
EXPOSE 8000
CMD ["billing", "serve", "--host", "0.0.0.0", "--port", "8000"]
