# The meshllm image: the `meshllm` command with the shared library and every service.
#
#   docker build -t meshllm .
#   docker run --rm -e MESHLLM_MODE=cluster -e MESHLLM_KAFKA__BOOTSTRAP=kafka:9092 meshllm topics create

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group meshllm
USER meshllm
WORKDIR /home/meshllm
ENTRYPOINT ["meshllm"]
CMD ["--help"]
