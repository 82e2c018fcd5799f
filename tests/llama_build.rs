//! How llama.cpp is built: without Intel AMX, even for a CPU that has it (`cmake/no-amx.cmake`
//! says why). Building llama.cpp takes minutes, so this builds a one-file CMake project the
//! same way instead: with the include that `.cargo/config.toml` hands llama-cpp-sys-2, and with
//! `-march=sapphirerapids` standing in for what GGML_NATIVE's `-march=native` means on such a
//! CPU. So the check does not depend on the CPU that runs it. Then it reads the CMake cache of
//! the llama.cpp that was linked, to see that the include ran in that build too.
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

const PROBE: &str = r#"
#if defined(__AMX_INT8__) || defined(__AMX_TILE__) || defined(__AMX_BF16__)
#error "AMX is on"
#endif
#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "AVX-512 VNNI is off"
#endif
int main() { return 0; }
"#;

/// Configures and builds the probe as llama.cpp's C and C++ are built: the flags ggml adds for
/// the CPU (here Sapphire Rapids, which has AMX) on the target, the include (if any) after
/// `project()`. Returns whether it built, and what CMake printed.
fn build_probe(include: Option<&Path>) -> (bool, String) {
    let d = temp_dir("no-amx");
    std::fs::write(
        d.join("CMakeLists.txt"),
        "cmake_minimum_required(VERSION 3.14)\n\
         project(probe C CXX)\n\
         add_executable(probe probe.cpp probe.c)\n\
         target_compile_options(probe PRIVATE -march=sapphirerapids)\n",
    )
    .unwrap();
    std::fs::write(d.join("probe.cpp"), PROBE).unwrap();
    std::fs::write(
        d.join("probe.c"),
        PROBE.replace("int main() { return 0; }", "int probe_c;"),
    )
    .unwrap();
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
    (out.status.success(), log)
}

#[test]
fn llama_cpp_is_compiled_without_amx_even_for_a_cpu_that_has_it() {
    // Without the include, the CPU's flags turn AMX on, and the probe says so.
    let (built, log) = build_probe(None);
    assert!(!built && log.contains("AMX is on"), "{log}");
    // With it, AMX is off in C and C++ alike, and AVX-512 with VNNI stays on.
    let (built, log) = build_probe(Some(&project_include()));
    assert!(built, "{log}");
    // And llama-cpp-sys-2 handed the include to the real llama.cpp build, which ran it and
    // found the flags usable: without that, everything above would pass and AMX stay on.
    let cache = llama_cmake_cache();
    assert!(
        cache.contains("BACKSTOP_CAN_DROP_AMX:INTERNAL=1"),
        "llama.cpp's CMake build did not run cmake/no-amx.cmake"
    );
}
