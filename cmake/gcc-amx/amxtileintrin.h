/* backstop: GCC's own amxtileintrin.h, with _tile_loadconfig declared to read the whole
 * 64-byte tile configuration. See cmake/amx.cmake, which puts this folder on the include path
 * of GCC's C and C++ compiles, ahead of GCC's own headers.
 *
 * GCC 12's header (and others of its age) hands ldtilecfg its operand as
 * `"m" (*((const void **)__config))`, telling the optimizer the instruction reads 8 bytes. A
 * configuration built in a local struct then loses every store past its first 8 bytes (the
 * rows and column widths) to dead-store elimination: ldtilecfg gets palette 1 with no tiles,
 * the CPU raises #GP and the process dies with SIGSEGV. That is llama.cpp's AMX crash on
 * Sapphire Rapids (llama.cpp issue 20824, ollama issue 17205), which depends on how the
 * optimizer happened to lay out ggml_tile_config_init: -O3 loses the stores, -O2 kept them. */
#include_next <amxtileintrin.h>

#if defined(__AMX_TILE__) && defined(__GNUC__) && !defined(__clang__) && !defined(BACKSTOP_AMX_TILECFG)
#define BACKSTOP_AMX_TILECFG 1

static __inline__ void __attribute__((__always_inline__))
backstop_tile_loadconfig(const void *config)
{
  /* The operand is the 64 bytes ldtilecfg reads, so every store to them is kept. */
  __asm__ volatile("ldtilecfg\t%0" : : "m"(*(const unsigned char (*)[64])config));
}

#undef _tile_loadconfig
#define _tile_loadconfig(config) backstop_tile_loadconfig(config)
#endif
