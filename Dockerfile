# One image for the publisher API, the subscribers, the exporter and the topic set-up step.
FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY eventaudit ./eventaudit
COPY dashboards ./dashboards
COPY tools ./tools
RUN pip install --no-cache-dir . && useradd --system eventaudit
USER eventaudit
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "eventaudit.exporter"]
