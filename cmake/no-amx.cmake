# Leave Intel AMX out of llama.cpp's CPU backend. CMake includes this file after each project()
# in llama.cpp's build (CMAKE_PROJECT_INCLUDE): .cargo/config.toml passes it to llama-cpp-sys-2,
# which hands CMAKE_* variables from the environment to CMake, and scripts/build-peers.sh passes
# it to the peers' builds so that both sides run the same kernels.
#
# Why: with GGML_NATIVE on a CPU that has AMX (Intel Xeon from Sapphire Rapids on, the usual host
# of a cloud VM or a GPU server), -march=native turns on ggml's AMX matrix multiply, and that
# crashes with SIGSEGV in ggml_backend_amx_mul_mat on the first prompt. We saw it on such a
# VM with SmolLM2 Q4_1 at llama.cpp 0c1e57098; it is llama.cpp issue 20824, and Ollama users met
# it on AWS m7i (ollama issue 17205). Ollama had already stopped shipping its AMX build because it
# was slower on Sapphire Rapids (ollama pull request 9203). GCC and Clang let an explicit -mno-*
# flag win over -march=native wherever it stands on the command line, so the AVX-512 and VNNI
# kernels stay. Only C and C++ get the flags (nvcc would refuse them), and only a compiler that
# knows them (GCC 11 or Clang 12 and newer, on x86).
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$" AND NOT MSVC)
  include(CheckCXXCompilerFlag)
  check_cxx_compiler_flag("-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" BACKSTOP_CAN_DROP_AMX)
  if(BACKSTOP_CAN_DROP_AMX)
    add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:-mno-amx-tile;-mno-amx-int8;-mno-amx-bf16>")
  endif()
endif()
