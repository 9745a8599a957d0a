# GPU image for cluster nodes: Ray + CUDA PyTorch with mergesec installed.
# Build:  docker build -t mergesec:latest .
# Head:   docker run --gpus all --net=host -v /shared:/shared mergesec ray start --head --block
# Worker: docker run --gpus all --net=host -v /shared:/shared mergesec ray start --address=HEAD:6379 --block
FROM rayproject/ray:2.60.0-py311-cu124

WORKDIR /opt/mergesec
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mergesec ./mergesec
COPY --chown=ray:users conf ./conf
# The base image's CUDA build of torch satisfies the project's range; install the rest.
RUN pip install --no-cache-dir "torch>=2.2" && pip install --no-cache-dir -e . \
    && python -c "import mergesec, ray, torch; print('mergesec ok, torch', torch.__version__)"
ENV HF_HOME=/shared/hf-cache MERGESEC_CACHE=/shared/mergesec-cache
CMD ["bash"]
