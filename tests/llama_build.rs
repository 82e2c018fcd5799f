//! How llama.cpp is built: with Intel AMX where the CPU has it, and with GCC's tile
//! configuration intrinsic wrapped so that the configuration reaches the CPU whole
//! (`cmake/amx.cmake` says why). Building llama.cpp takes minutes, so this builds a one-file
//! CMake project the same way instead: with the include that `.cargo/config.toml` hands
//! llama-cpp-sys-2, at llama-cpp-sys-2's -O3, and with `-march=sapphirerapids` standing in for
//! what GGML_NATIVE's `-march=native` means on such a CPU, so the build checks do not depend on
//! the CPU that runs them. Where the CPU has AMX, the probe also runs: it configures the tiles
//! as ggml does and multiplies with them. Then it reads the CMake cache of the llama.cpp that
//! was linked, to see that the include ran in that build too.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{checkout, temp_dir};

/// The file `.cargo/config.toml` passes to llama.cpp's CMake build as CMAKE_PROJECT_INCLUDE.
fn project_include() -> PathBuf {
    let config_path = checkout().join(".cargo").join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let config: toml::Value = toml::from_str(&text).unwrap();
    let entry = config
        .get("env")
        .and_then(|env| env.get("CMAKE_PROJECT_INCLUDE"))
        .unwrap_or_else(|| {
            panic!(
                "{} sets no [env] CMAKE_PROJECT_INCLUDE",
                config_path.display()
            )
        });
    assert_eq!(
        entry.get("relative").and_then(toml::Value::as_bool),
        Some(true),
        "the path must be relative to the checkout: {entry}"
    );
    let path = checkout().join(entry.get("value").and_then(toml::Value::as_str).unwrap());
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The CMake cache of the llama.cpp this test binary's profile linked into `backstop`:
/// llama-cpp-sys-2 builds it under `build/llama-cpp-sys-2-*/out/build` beside `deps/`, where
/// this binary is; a folder left by an earlier configuration may sit beside it, so the newest.
fn llama_cmake_cache() -> String {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let newest = std::fs::read_dir(profile.join("build"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name()
                .to_str()?
                .starts_with("llama-cpp-sys-2-")
                .then_some(())?;
            let cache = e.path().join("out/build/CMakeCache.txt");
            Some((cache.metadata().ok()?.modified().ok()?, cache))
        })
        .max()
        .unwrap_or_else(|| panic!("no llama.cpp CMake cache under {}", profile.display()));
    std::fs::read_to_string(newest.1).unwrap()
}

/// Built as C++ (ggml's AMX kernels) and as C (ggml's CPU backend includes the same intrinsics
/// header). With GCC, the wrapper must be in effect; AMX and AVX-512 VNNI must stay on. The
/// C++ program configures the tiles from a local struct in a function of its own, as
/// `ggml_tile_config_init` does (the pattern GCC's own header lets the optimizer break), then
/// multiplies a 16x64 matrix of ones with one of twos: every sum is 64 products of 2.
const PROBE: &str = r#"
#if defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#ifndef BACKSTOP_AMX_TILECFG
#error "GCC's own _tile_loadconfig is in effect"
#endif
#endif
#if !defined(__AMX_INT8__) || !defined(__AMX_TILE__)
#error "AMX is off"
#endif
#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "AVX-512 VNNI is off"
#endif
"#;

const PROBE_MAIN: &str = r#"
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct tile_config {
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};

__attribute__((noinline)) static void configure_tiles() {
    alignas(64) tile_config tc = {};
    tc.palette_id = 1;
    for (int i = 0; i < 3; i++) {
        tc.rows[i] = 16;
        tc.colsb[i] = 64;
    }
    _tile_loadconfig(&tc);
}

int main() {
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, as ggml asks before its first tile.
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
        fprintf(stderr, "the kernel refused AMX\n");
        return 2;
    }
    configure_tiles();
    alignas(64) static int8_t a[16 * 64], b[16 * 64];
    alignas(64) static int32_t c[16 * 16];
    memset(a, 1, sizeof a);
    memset(b, 2, sizeof b);
    _tile_zero(2);
    _tile_loadd(0, a, 64);
    _tile_loadd(1, b, 64);
    _tile_dpbssd(2, 0, 1);
    _tile_stored(2, c, 64);
    _tile_release();
    for (int i = 0; i < 16 * 16; i++) {
        if (c[i] != 128) {
            fprintf(stderr, "c[%d] = %d, not 128\n", i, c[i]);
            return 1;
        }
    }
    printf("tiles ok\n");
    return 0;
}
"#;

/// Configures and builds the probe as llama.cpp's C and C++ are built: llama-cpp-sys-2's -O3,
/// the flags ggml adds for the CPU (here Sapphire Rapids, which has AMX) on the target, the
/// include (if any) after `project()`. Returns the probe program if it built, and what CMake
/// printed.
fn build_probe(include: Option<&Path>) -> (Option<PathBuf>, String) {
    let d = temp_dir("amx");
    std::fs::write(
        d.join("CMakeLists.txt"),
        "cmake_minimum_required(VERSION 3.14)\n\
         project(probe C CXX)\n\
         add_executable(probe probe.cpp probe.c)\n\
         target_compile_options(probe PRIVATE -O3 -march=sapphirerapids)\n",
    )
    .unwrap();
    std::fs::write(d.join("probe.cpp"), format!("{PROBE}{PROBE_MAIN}")).unwrap();
    std::fs::write(d.join("probe.c"), format!("{PROBE}int probe_c;\n")).unwrap();
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(&d).arg("-B").arg(d.join("build"));
    if let Some(include) = include {
        configure.arg(format!("-DCMAKE_PROJECT_INCLUDE={}", include.display()));
    }
    let out = configure.output().expect("cmake runs");
    let mut log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "configure failed:\n{log}");
    let out = Command::new("cmake")
        .arg("--build")
        .arg(d.join("build"))
        .output()
        .expect("cmake runs");
    log += &String::from_utf8_lossy(&out.stdout);
    log += &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success().then(|| d.join("build").join("probe")),
        log,
    )
}

#[test]
fn llama_cpp_is_compiled_with_amx_and_gcc_loads_whole_tile_configs() {
    let (probe, log) = build_probe(None);
    if log.contains("CXX compiler identification is GNU") {
        // Without the include, GCC's own intrinsic is in effect, and the probe says so.
        assert!(
            probe.is_none() && log.contains("GCC's own _tile_loadconfig is in effect"),
            "{log}"
        );
    }
    // With it, the wrapper is in effect in C and C++ alike, and AMX with AVX-512 VNNI stays on.
    let (probe, log) = build_probe(Some(&project_include()));
    let probe = probe.unwrap_or_else(|| panic!("the probe did not build:\n{log}"));
    if common::cpu_has_amx() {
        // And on a CPU with AMX, tiles configured as ggml configures them multiply rightly
        // (GCC's own intrinsic at -O3 dies here with SIGILL or SIGSEGV).
        let out = Command::new(&probe).output().expect("the probe runs");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tiles ok"),
            "{:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And llama-cpp-sys-2 handed the include to the real llama.cpp build, which ran it: without
    // that, everything above would pass and llama.cpp be built with GCC's own intrinsic.
    let cache = llama_cmake_cache();
    assert!(
        cache.contains("BACKSTOP_AMX_INCLUDE:INTERNAL=gcc-tilecfg"),
        "llama.cpp's CMake build did not run cmake/amx.cmake"
    );
}
