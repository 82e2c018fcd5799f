# Intel AMX in llama.cpp's CPU backend, built so that it works with GCC. CMake includes this file
# after each project() in llama.cpp's build (CMAKE_PROJECT_INCLUDE): .cargo/config.toml passes it
# to llama-cpp-sys-2, which hands CMAKE_* variables from the environment to CMake, and
# scripts/build-peers.sh passes it to the peers' builds so that both sides run the same kernels.
#
# With GGML_NATIVE on a CPU that has AMX (Intel Xeon from Sapphire Rapids on, the usual host of
# a cloud VM or a GPU server), -march=native turns on ggml's AMX matrix multiply: on the 2-core
# Sapphire Rapids VM we measure on it reads prompts 3-4x and generates about 1.7x as fast as
# the AVX-512 VNNI kernels (SmolLM2 Q4_1). Built with GCC at -O3, as llama-cpp-sys-2 builds it,
# it crashed instead with SIGSEGV in ggml_backend_amx_mul_mat on the first prompt (llama.cpp
# issue 20824, ollama issue 17205). The cause is GCC's _tile_loadconfig, which tells the
# optimizer that ldtilecfg reads 8 of the configuration's 64 bytes, so the stores of the
# tiles' shapes are dropped and the CPU refuses the configuration: gcc-amx/amxtileintrin.h
# wraps GCC's header and declares the whole 64 bytes. Clang's intrinsic is a builtin that
# knows its size, so only GCC's C and C++ compiles get the folder (nvcc never does).
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$" AND NOT MSVC)
  set(BACKSTOP_AMX_FIX_DIR "${CMAKE_CURRENT_LIST_DIR}/gcc-amx")
  add_compile_options(
    "$<$<COMPILE_LANG_AND_ID:C,GNU>:-isystem${BACKSTOP_AMX_FIX_DIR}>"
    "$<$<COMPILE_LANG_AND_ID:CXX,GNU>:-isystem${BACKSTOP_AMX_FIX_DIR}>")
endif()
# What tests/llama_build.rs and scripts/setup.sh look for in llama.cpp's CMake cache: this
# file ran in that build (a cache built with the earlier include, which left AMX out, lacks it).
set(BACKSTOP_AMX_INCLUDE "gcc-tilecfg" CACHE INTERNAL "backstop's cmake/amx.cmake ran")
