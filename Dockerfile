# dvae on a CUDA GPU machine: the package (not editable) with its sweep extra, dvae-train as the entry point.
#   docker build -t dvae .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/runs" -v /data:/data dvae \
#     model=dalle data=folder data.root=/data/images strategy=ddp trainer.devices=8 precision=bf16-mixed
# Run directories (checkpoints, logs, images) go to /runs, a volume.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/dvae
COPY pyproject.toml README.md ./
COPY dvae ./dvae
COPY configs ./configs
RUN python -m pip install ".[sweep]"

WORKDIR /runs
VOLUME ["/runs"]
ENTRYPOINT ["dvae-train"]
