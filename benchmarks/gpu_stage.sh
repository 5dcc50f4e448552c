#!/usr/bin/env bash
# Packs what the GPU benchmarks need for a CUDA machine that has Python 3.12, torch 2.11.0+cu130, transformers,
# peft and accelerate but no package index: vLLM 0.26.0 (the release built for that torch and CUDA 13) with the
# packages its image lacks, bitsandbytes, TRL, datasets and Liger, installed into one site directory, plus the
# tokenizer of loraplex's default model (the 49,152-token vocabulary the benchmark model uses). The result is
# split into parts small enough to carry one per run (benchmarks/gpu_run.sh stage NN):
#   bash benchmarks/gpu_stage.sh [DEST]          (DEST defaults to .gpu-stage, which git ignores)
set -euo pipefail
dest=${1:-.gpu-stage}
part_size=${PART_SIZE:-56M}
python=${PYTHON:-python3}
mkdir -p "$dest/wheels"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
# xgrammar 0.2.6: 0.2.9 needs a newer apache-tvm-ffi than vLLM 0.26 pins. flashinfer-python: the sampler imports
# it. numba, numpy, protobuf, torch and the nvidia-* libraries must come from the machine's image.
pkgs="vllm==0.26.0 xgrammar==0.2.6 apache-tvm-ffi==0.1.10 torch-c-dlpack-ext==0.1.5 flashinfer-python==0.6.14
agent-detector==2.0.0 annotated-types==0.8.0 anthropic==2.14.0 astor==0.8.1 blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0
cffi==2.1.1 compressed-tensors==0.17.0 cryptography==50.0.2 depyf==0.20.0 detect-installer==0.2.1 dill==0.4.1 dnspython==2.9.2
docstring-parser==0.18.0 email-validator==2.4.0 fastapi-cli==0.0.34 fastapi==0.136.3 fastar==0.12.0
googleapis-common-protos==1.76.0 httpcore2==2.16.2 httptools==0.9.0 httpx2==2.16.2 ijson==3.6.0 interegular==0.3.3
jiter==0.19.0 jmespath==1.1.0 jsonschema-specifications==2025.9.1 jsonschema==4.26.0 lark==1.2.2 llguidance==1.7.6
lm-format-enforcer==0.11.3 loguru==0.7.3 mcp-types==2.3.0 mcp==2.3.0 mistral-common==1.13.1
model-hosting-container-standards==0.1.16 msgspec==0.22.0 nvtx==0.2.15 openai-harmony==0.0.8 openai==3.57.0
opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp==1.45.2 opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions-ai==0.5.1 opentelemetry-semantic-conventions==0.66b2
outlines-core==0.2.14 partial-json-parser==0.2.1.1.post7 prometheus-fastapi-instrumentator==8.1.0 pybase64==1.5.1
pycountry==26.2.16 pycparser==3.12 pydantic-core==2.50.5 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3
pydantic==2.14.4 pyjwt==2.15.1 python-dotenv==1.2.4 python-json-logger==4.2.0 python-multipart==0.0.34 pyzmq==27.3.0
referencing==0.37.0 rich-toolkit==0.20.6 rignore==0.8.1 rpds-py==2026.9.1 setproctitle==1.3.8 sniffio==1.3.1
sse-starlette==3.7.0 starlette==1.10.0 supervisor==4.3.0 truststore==0.10.5 typing-inspection==0.4.5 uvicorn==0.54.0
watchfiles==1.3.0 websockets==17.4
bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 multiprocess==0.70.19 liger-kernel==0.8.5"
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dest/wheels" $pkgs
rm -rf "$dest/site"
"$python" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --target "$dest/site" "$dest"/wheels/*.whl
# Left out, 180 MB of transfer the benchmarks never load: FlashAttention 2 kernels (vLLM runs FlashAttention 3 on
# compute capability 9.x and imports FA2 only if present), the Rust frontend (off unless VLLM_USE_RUST_FRONTEND=1),
# bitsandbytes builds for other CUDA, ROCm and XPU versions, DeepGEMM builds for other Pythons, console scripts.
rm -rf "$dest/site/bin" "$dest/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$dest/site/vllm/vllm-rs"
find "$dest/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
find "$dest/site/vllm/third_party/deep_gemm" -name '_C.cpython-*.so' ! -name '*cpython-312*' -delete
tokenizer=$("$python" -c "from loraplex.models import resolve_base_model, DEFAULT_MODEL; print(resolve_base_model(DEFAULT_MODEL))")
mkdir -p "$dest/site/tok"
cp "$tokenizer"/tokenizer.json "$tokenizer"/tokenizer_config.json "$tokenizer"/chat_template.jinja "$dest/site/tok/"
# xz at its fastest level still halves the CUDA kernels that the wheels' zip compression leaves large
rm -f "$dest"/part*
tar cf - -C "$dest/site" . | xz -1 -T2 | split -b "$part_size" -d -a 2 - "$dest/part"
ls -la "$dest"/part*
