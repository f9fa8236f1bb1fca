#!/usr/bin/env bash
# Idempotent set-up of a fresh machine for csp-tch: libtorch 2.13 from PyPI (the version tch 0.26 binds
# to; a CUDA build that also runs on CPU) in a venv outside the repo, and .cargo/config.toml pointing
# cargo at it, so that plain `cargo build`, `cargo run` and `cargo test` work afterwards. The same
# venv's Python runs the PyTorch peer (scripts/bench_pytorch.py) that the tests compare with.
#   CSP_TCH_TORCH_HOME  where the venv lives (default ~/.cache/csp-tch)
#   LIBTORCH            your own libtorch 2.13: csp-tch builds against it; the venv is still made,
#                       for the peer, unless python3 already has torch
# A second run does no network work and returns in about a second.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
torch_version=2.13.0
# timm, for the PyTorch peer: the CSPNet paper's models are timm's own, and csp-tch's are checked against them.
timm_version=1.0.31
torchvision_version=0.28.0
config="$repo/.cargo/config.toml"
home=${CSP_TCH_TORCH_HOME:-$HOME/.cache/csp-tch}
venv="$home/venv"

write_config() { # LIBTORCH-path python-path
  local want
  want=$(printf '# Written by scripts/setup.sh; a LIBTORCH in your environment overrides it.\n[env]\nLIBTORCH = "%s"\nCSP_TCH_PYTHON = "%s"\n' "$1" "$2")
  if [ "$(cat "$config" 2>/dev/null)" != "$want" ]; then
    mkdir -p "$(dirname "$config")"
    printf '%s\n' "$want" > "$config.tmp" && mv "$config.tmp" "$config"
  fi
}

# The venv's site-packages, asked of its Python (one folder even if the venv holds several python3.*).
site_packages() {
  "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null
}

installed_version() {
  local site
  site=$(site_packages) || return 0
  sed -n "s/^__version__ = '\([0-9.]*\).*/\1/p" "$site/torch/version.py" 2>/dev/null | head -n 1
}

install_torch() {
  if [ "$(installed_version)" != "$torch_version" ]; then
    echo "setup: installing torch==$torch_version into $venv (about 4.7 GB, a few minutes)"
    command -v python3 >/dev/null || { echo "setup: python3 is needed to install libtorch from PyPI" >&2; exit 1; }
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$torch_version" numpy
  fi
  local site
  site=$(site_packages)
  if ! grep -q "__version__ = '$timm_version'" "$site/timm/version.py" 2>/dev/null; then
    echo "setup: installing timm==$timm_version into $venv (for the PyTorch peer)"
    # torch and the torchvision built for it pinned in the same call: left free, pip upgrades torch for timm.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$torch_version" \
      "torchvision==$torchvision_version" "timm==$timm_version"
  fi
}

# nasm, with which mozjpeg-sys builds libjpeg-turbo's SIMD kernels for the image-folder decoder
# (the same pixels, about 1.3x faster; it decides when it is built, by finding `nasm` on PATH).
# When none is on PATH, Debian's binary (0.4 MB, it needs only libc) is unpacked next to
# cargo, and a libjpeg-turbo built without it is rebuilt once. Failing that, set-up goes on: the
# decoder is then libjpeg-turbo's plain C, and `csp-tch env` says so.
install_nasm() {
  command -v nasm >/dev/null && return 0
  local bin=${CARGO_HOME:-$HOME/.cargo}/bin tmp
  local plain="JPEGs will decode with libjpeg-turbo's plain C kernels (the same pixels, slower)"
  case ":$PATH:" in
    *":$bin:"*) ;;
    *) echo "setup: no nasm on PATH and $bin is not on PATH either; $plain" >&2; return 0 ;;
  esac
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "setup: no nasm on PATH and no apt-get to fetch Debian's; $plain" >&2
    return 0
  fi
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq nasm >/dev/null 2>&1 && dpkg-deb -x nasm_*.deb unpacked) \
    && "$tmp/unpacked/usr/bin/nasm" -v >/dev/null 2>&1; then
    cp "$tmp/unpacked/usr/bin/nasm" "$bin/nasm.tmp" && mv "$bin/nasm.tmp" "$bin/nasm"
    echo "setup: installed Debian's nasm into $bin (libjpeg-turbo's SIMD kernels)"
    cargo clean --manifest-path "$repo/Cargo.toml" --release --quiet -p mozjpeg-sys 2>/dev/null || true
    cargo clean --manifest-path "$repo/Cargo.toml" --quiet -p mozjpeg-sys 2>/dev/null || true
  else
    echo "setup: could not fetch Debian's nasm (apt-get download nasm); $plain" >&2
  fi
  rm -rf "$tmp"
}
install_nasm

if [ -n "${LIBTORCH:-}" ]; then
  if [ ! -e "$LIBTORCH/lib/libtorch.so" ]; then
    echo "setup: LIBTORCH=$LIBTORCH has no lib/libtorch.so; unset LIBTORCH to let this script install libtorch $torch_version" >&2
    exit 1
  fi
  if python3 -c 'import torch, timm' 2>/dev/null; then
    python=$(command -v python3)
  else
    install_torch
    python="$venv/bin/python"
  fi
  write_config "$LIBTORCH" "$python"
  echo "setup: using your LIBTORCH=$LIBTORCH; the PyTorch peer runs on $python"
  exit 0
fi

install_torch
torch_dir="$(site_packages)/torch"
[ -e "$torch_dir/lib/libtorch.so" ] || { echo "setup: $torch_dir/lib/libtorch.so missing; delete $venv and run again" >&2; exit 1; }
# The CUDA runtime headers' crt/ part, which the torch wheel leaves out and src/native/cuda_graph.cpp needs
# (166 kB, matching the wheel's CUDA 13.0).
if [ ! -e "$torch_dir/../nvidia/cu13/include/crt/host_config.h" ]; then
  echo "setup: installing nvidia-cuda-crt (the CUDA headers csp-tch's CUDA graphs compile against)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-crt==13.0.*"
fi
# CCCL's headers (<nv/target>), which CUDA's cuda_fp16.h includes where c10d's NCCL process group
# (src/native/distributed.cpp) is compiled; without them csp-tch is built with Gloo only.
if [ ! -e "$torch_dir/../nvidia/cu13/include/nv/target" ]; then
  echo "setup: installing nvidia-cuda-cccl (the CUDA headers csp-tch's NCCL process group compiles against)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-cccl==13.0.*"
fi
write_config "$torch_dir" "$venv/bin/python"
echo "setup: libtorch $torch_version at $torch_dir"
