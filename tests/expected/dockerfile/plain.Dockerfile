FROM alpine:3.19 as fetch
RUN wget -O /src.tar.gz https://example.org/src.tar.gz

FROM debian:12 as tools
COPY --from=fetch /src.tar.gz /tmp/
RUN tar -C /opt -xf /tmp/src.tar.gz

FROM debian:12
# Build as an unprivileged user
SHELL [ "/bin/bash", "-c" ]
USER 1000:1000
WORKDIR /home/user
ENV GREETING="say \"hi\" \\ `now`"
RUN apt-get update && \
    apt-get install -y make && \
    pip install -r requirements.txt
COPY --chown=1000:1000 Makefile src ./
COPY --chown=1000:1000 --from=tools /opt/tool /usr/local/bin/tool
USER builder
COPY --chown=builder README.md /home/builder/
RUN make
