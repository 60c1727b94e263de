//! Checking a function's module before anything stores or runs it: a
//! WebAssembly module that validates, imports only what the agent provides
//! ([`sundial_protocol::wasm::WASI_IMPORTS`], with their signatures) and
//! exports its entry point and memory as WASI preview 1 commands do.

use sundial_protocol::wasm::{wasi_signature, ModuleHash, WASI_MODULE};
use sundial_protocol::wire::ModuleInfo;
use wasmi::{Engine, ExternType, Module, ValType};

/// The module's checked description, or why it is refused.
pub fn inspect(bytes: &[u8], limit: u64) -> Result<ModuleInfo, String> {
    if bytes.len() as u64 > limit {
        return Err(format!(
            "the module is {} bytes; the most this coordinator takes is {limit} (its --wasm-module-max setting)",
            bytes.len()
        ));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(
            "not a WebAssembly module (a binary .wasm file starts with \\0asm; assemble a .wat file first, e.g. with wat2wasm)".into(),
        );
    }
    // The parser is not expected to panic on any input; if it did, the
    // module is refused and the coordinator goes on.
    let parsed = std::panic::catch_unwind(|| Module::new(&Engine::default(), bytes))
        .map_err(|_| "the module could not be parsed".to_string())?;
    let module = parsed.map_err(|e| format!("not a valid WebAssembly module: {e}"))?;
    let mut imports = Vec::new();
    for import in module.imports() {
        let what = format!("{}.{}", import.module(), import.name());
        let ExternType::Func(ty) = import.ty() else {
            return Err(format!(
                "the module imports `{what}`, which is not a function: the agent provides only WASI preview 1 functions ({WASI_MODULE})"
            ));
        };
        let Some(want) = wasi_signature(import.module(), import.name()) else {
            return Err(if import.module() == WASI_MODULE {
                format!("the module imports `{what}`, which is not a WASI preview 1 function the agent provides")
            } else {
                format!(
                    "the module imports `{what}`: the agent provides only WASI preview 1 ({WASI_MODULE}); build for wasm32-wasip1"
                )
            });
        };
        let has = signature(ty.params(), ty.results());
        if has != want {
            return Err(format!(
                "the module imports `{what}` with the signature {has}; WASI preview 1 has {want}"
            ));
        }
        imports.push(what);
    }
    let mut start = false;
    let mut memory = false;
    for export in module.exports() {
        match (export.name(), export.ty()) {
            ("_start", ExternType::Func(ty))
                if ty.params().is_empty() && ty.results().is_empty() =>
            {
                start = true
            }
            ("memory", ExternType::Memory(_)) => memory = true,
            _ => {}
        }
    }
    if !start {
        return Err(
            "the module exports no `_start` function taking and returning nothing: build a WASI command (a `main`), not a library".into(),
        );
    }
    if !memory {
        return Err("the module exports no memory named `memory`, which WASI needs".into());
    }
    Ok(ModuleInfo {
        hash: ModuleHash::of(bytes),
        size: bytes.len() as u64,
        imports,
    })
}

/// A signature in [`sundial_protocol::wasm::WASI_IMPORTS`]'s notation.
fn signature(params: &[ValType], results: &[ValType]) -> String {
    let letter = |t: &ValType| match t {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        ValType::F32 => 'f',
        ValType::F64 => 'F',
        _ => '?',
    };
    let p: String = params.iter().map(letter).collect();
    let r: String = results.iter().map(letter).collect();
    format!("{p}->{r}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("valid WAT")
    }

    #[test]
    fn modules_are_checked_for_what_the_agent_provides() {
        let ok = wat(r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")))"#);
        let info = inspect(&ok, 1 << 20).expect("accepted");
        assert_eq!(info.imports, ["wasi_snapshot_preview1.fd_write"]);
        assert_eq!(info.hash, ModuleHash::of(&ok));

        for (text, says) in [
            (
                r#"(module (import "env" "socket" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
                "env.socket",
            ),
            (
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32))) (memory (export "memory") 1) (func (export "_start")))"#,
                "signature",
            ),
            (
                r#"(module (import "wasi_snapshot_preview1" "sock_open" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
                "sock_open",
            ),
            (
                r#"(module (memory (export "memory") 1) (func (export "main")))"#,
                "_start",
            ),
            (r#"(module (func (export "_start")))"#, "memory"),
            (
                r#"(module (import "env" "mem" (memory 1)) (func (export "_start")))"#,
                "not a function",
            ),
        ] {
            let e = inspect(&wat(text), 1 << 20).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
        assert!(inspect(b"#!/bin/sh\necho hi\n", 1 << 20)
            .expect_err("script")
            .contains("not a WebAssembly"));
        assert!(inspect(b"\0asm\x01\0\0\0\x99", 1 << 20)
            .expect_err("corrupt")
            .contains("not a valid"));
        assert!(inspect(&ok, 10)
            .expect_err("large")
            .contains("--wasm-module-max"));
    }
}
