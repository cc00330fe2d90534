# syntax=docker/dockerfile:1
# Build: docker build -t cratere .
# Run:   docker run -p 8000:8000 -v cratere-data:/data -e CRATERE_HOST=proxy.example.internal cratere

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin cratere \
    && strip target/release/cratere

FROM debian:bookworm-slim
# git serves the git index; ca-certificates for https upstreams; curl for the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home cratere \
    && mkdir -p /data \
    && chown cratere:cratere /data
COPY --from=build /src/target/release/cratere /usr/local/bin/cratere
ENV CRATERE_CACHE=/data/crates \
    CRATERE_INDEX=/data/index \
    CRATERE_PORT=8000
USER 10001:10001
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${CRATERE_PORT}/health" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cratere"]
CMD ["serve"]
