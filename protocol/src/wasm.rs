//! Functions: tasks that carry their own code, a WebAssembly module run
//! sandboxed on the agent (WASI preview 1, new in 0.7).
//!
//! A module is stored once, content-addressed by its SHA-256
//! ([`ModuleHash`]), on the coordinator and on every agent with a task that
//! uses it; a task names it ([`WasmSpec::module`]). Modules travel to
//! agents in [`MODULE_CHUNK_BYTES`] pieces beside their assignments
//! ([`crate::wire::CoordMsg::Module`]), and to the coordinator the same way
//! from `sundialctl` ([`crate::wire::AdminRequest::ModuleUpload`]).
//!
//! What a function may import is fixed here ([`WASI_IMPORTS`]): the agent
//! provides exactly these, and the coordinator refuses a module that
//! imports anything else, before any agent sees it.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::seal::SealedEnv;

/// The module name of WASI preview 1 imports.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Every WASI preview 1 function the agent provides, with its signature
/// (`i` = i32, `I` = i64; params `->` results). Those for sockets, file
/// systems the owner did not open and the like are there too and answer
/// with an error code (`ENOSYS`, `EBADF`, `ENOTCAPABLE`), so that a module
/// built by a toolchain that links them in still runs.
pub const WASI_IMPORTS: &[(&str, &str)] = &[
    ("args_get", "ii->i"),
    ("args_sizes_get", "ii->i"),
    ("environ_get", "ii->i"),
    ("environ_sizes_get", "ii->i"),
    ("clock_res_get", "ii->i"),
    ("clock_time_get", "iIi->i"),
    ("fd_advise", "iIIi->i"),
    ("fd_allocate", "iII->i"),
    ("fd_close", "i->i"),
    ("fd_datasync", "i->i"),
    ("fd_fdstat_get", "ii->i"),
    ("fd_fdstat_set_flags", "ii->i"),
    ("fd_fdstat_set_rights", "iII->i"),
    ("fd_filestat_get", "ii->i"),
    ("fd_filestat_set_size", "iI->i"),
    ("fd_filestat_set_times", "iIIi->i"),
    ("fd_pread", "iiiIi->i"),
    ("fd_prestat_get", "ii->i"),
    ("fd_prestat_dir_name", "iii->i"),
    ("fd_pwrite", "iiiIi->i"),
    ("fd_read", "iiii->i"),
    ("fd_readdir", "iiiIi->i"),
    ("fd_renumber", "ii->i"),
    ("fd_seek", "iIii->i"),
    ("fd_sync", "i->i"),
    ("fd_tell", "ii->i"),
    ("fd_write", "iiii->i"),
    ("path_create_directory", "iii->i"),
    ("path_filestat_get", "iiiii->i"),
    ("path_filestat_set_times", "iiiiIIi->i"),
    ("path_link", "iiiiiii->i"),
    ("path_open", "iiiiiIIii->i"),
    ("path_readlink", "iiiiii->i"),
    ("path_remove_directory", "iii->i"),
    ("path_rename", "iiiiii->i"),
    ("path_symlink", "iiiii->i"),
    ("path_unlink_file", "iii->i"),
    ("poll_oneoff", "iiii->i"),
    ("proc_exit", "i->"),
    ("proc_raise", "i->i"),
    ("sched_yield", "->i"),
    ("random_get", "ii->i"),
    ("sock_accept", "iii->i"),
    ("sock_recv", "iiiiii->i"),
    ("sock_send", "iiiii->i"),
    ("sock_shutdown", "ii->i"),
];

/// The signature the agent provides for a WASI import, if it provides it.
pub fn wasi_signature(module: &str, name: &str) -> Option<&'static str> {
    if module != WASI_MODULE {
        return None;
    }
    WASI_IMPORTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, sig)| *sig)
}

/// A module's size limit on the coordinator unless its operator sets
/// another (`wasm_module_max`), and an agent's unless its owner does.
pub const MODULE_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;
/// The largest module any peer accepts, whatever its settings.
pub const MODULE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// One piece of a module on the wire: well under the frame cap.
pub const MODULE_CHUNK_BYTES: usize = 512 * 1024;
/// Instructions a function may run, unless its task says otherwise.
pub const FUEL_DEFAULT: u64 = 1_000_000_000;
/// Linear memory a function may grow to, unless its task says otherwise.
pub const MEMORY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// The largest memory a task may ask for (4 GiB: wasm32's address space).
pub const MEMORY_BYTES_LIMIT: u64 = 4 * 1024 * 1024 * 1024;
/// An agent's ceilings unless its owner sets others.
pub const FUEL_CEILING_DEFAULT: u64 = 100_000_000_000;
pub const MEMORY_CEILING_DEFAULT: u64 = 256 * 1024 * 1024;

/// A module's SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ModuleHash {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut h = [0u8; 32];
        h.copy_from_slice(d.as_ref());
        ModuleHash(h)
    }

    /// Lower-case hex, as shown.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Reads 64 hex digits.
    pub fn parse(s: &str) -> Result<ModuleHash, String> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{s}` is not a SHA-256 (64 hex digits)"));
        }
        let mut h = [0u8; 32];
        for (i, out) in h.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("`{s}` is not a SHA-256"))?;
        }
        Ok(ModuleHash(h))
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", self.short())
    }
}

/// A function to run: a module, its arguments and environment, its limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmSpec {
    pub module: ModuleHash,
    /// The module's size in bytes.
    pub module_bytes: u64,
    /// Arguments after the program name (`argv[0]` is the task's name or
    /// `function`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sealed_env: Vec<SealedEnv>,
    /// Instructions it may run (`None`: [`FUEL_DEFAULT`]).
    pub fuel: Option<u64>,
    /// Memory it may grow to, bytes (`None`: [`MEMORY_BYTES_DEFAULT`]).
    pub memory_bytes: Option<u64>,
}

impl WasmSpec {
    pub fn fuel(&self) -> u64 {
        self.fuel.unwrap_or(FUEL_DEFAULT)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.unwrap_or(MEMORY_BYTES_DEFAULT)
    }

    /// Why this spec is not acceptable from any peer, or `None`.
    pub fn refusal(&self) -> Option<String> {
        if self.module_bytes == 0 || self.module_bytes > MODULE_BYTES_LIMIT {
            return Some(format!(
                "a module of {} bytes: modules are 1 byte to {MODULE_BYTES_LIMIT} bytes",
                self.module_bytes
            ));
        }
        if self.fuel == Some(0) {
            return Some("fuel 0: a function needs some fuel to run".into());
        }
        if let Some(m) = self.memory_bytes {
            if !(64 * 1024..=MEMORY_BYTES_LIMIT).contains(&m) {
                return Some(format!(
                    "memory of {m} bytes: a function's memory limit is 64 KiB to 4 GiB"
                ));
            }
        }
        for (name, _) in &self.env {
            if let Some(why) = env_name_refusal(name) {
                return Some(why);
            }
        }
        None
    }
}

/// Why a function may not have the environment variable `name`: only
/// plain identifiers. (Inside the sandbox a variable is data, not a way to
/// load code, so no list of dangerous names applies.)
pub fn env_name_refusal(name: &str) -> Option<String> {
    let plain = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (!plain).then(|| {
        format!("environment variable `{name}`: names are letters, digits and `_`, not starting with a digit")
    })
}

/// Parses a byte size: `65536`, `64KiB`, `64MiB`, `1GiB` (also `K`, `M`,
/// `G`, `KB`, `MB`, `GB`, all powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (expected e.g. 64MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Shows bytes for people: `64 MiB`, `1.5 KiB`, `312 B`.
pub fn show_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (u, m) in UNITS {
        if n >= m {
            return if n % m == 0 {
                format!("{} {u}", n / m)
            } else {
                format!("{:.1} {u}", n as f64 / m as f64)
            };
        }
    }
    format!("{n} B")
}

/// Puts a module together from its chunks, in order; bounded by the size
/// announced, which is checked against the caller's limit first.
#[derive(Debug)]
pub struct Assembly {
    pub hash: ModuleHash,
    pub size: u64,
    bytes: Vec<u8>,
}

impl Assembly {
    /// Starts a module of `size` bytes, if `size` is within `limit`.
    pub fn start(hash: ModuleHash, size: u64, limit: u64) -> Result<Assembly, String> {
        if size == 0 || size > limit.min(MODULE_BYTES_LIMIT) {
            return Err(format!(
                "module {} is {size} bytes; the most accepted here is {}",
                hash.short(),
                limit.min(MODULE_BYTES_LIMIT)
            ));
        }
        Ok(Assembly {
            hash,
            size,
            bytes: Vec::new(),
        })
    }

    /// Adds the chunk at `offset`; the whole module, checked against its
    /// hash, once the last chunk is in.
    pub fn add(&mut self, offset: u64, chunk: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if offset != self.bytes.len() as u64 {
            return Err(format!(
                "module {}: a chunk at {offset}, expected at {}",
                self.hash.short(),
                self.bytes.len()
            ));
        }
        if chunk.is_empty() || self.bytes.len() as u64 + chunk.len() as u64 > self.size {
            return Err(format!(
                "module {}: a chunk of {} bytes at {offset} does not fit its {} bytes",
                self.hash.short(),
                chunk.len(),
                self.size
            ));
        }
        self.bytes.extend_from_slice(chunk);
        if (self.bytes.len() as u64) < self.size {
            return Ok(None);
        }
        let bytes = std::mem::take(&mut self.bytes);
        if ModuleHash::of(&bytes) != self.hash {
            return Err(format!(
                "module {}: its bytes do not have that SHA-256",
                self.hash.short()
            ));
        }
        Ok(Some(bytes))
    }
}

/// The chunks of `bytes`, as `(offset, chunk)`.
pub fn chunks(bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    bytes
        .chunks(MODULE_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| ((i * MODULE_CHUNK_BYTES) as u64, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_read_back_and_sizes_parse() {
        let h = ModuleHash::of(b"abc");
        assert_eq!(
            h.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ModuleHash::parse(&h.to_string()), Ok(h));
        assert!(ModuleHash::parse("abc").is_err());
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
        assert_eq!(show_bytes(64 << 20), "64 MiB");
        assert_eq!(show_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn a_module_is_assembled_in_order_and_checked() {
        let bytes: Vec<u8> = (0..(MODULE_CHUNK_BYTES * 2 + 10))
            .map(|i| i as u8)
            .collect();
        let hash = ModuleHash::of(&bytes);
        let mut a = Assembly::start(hash, bytes.len() as u64, MODULE_BYTES_DEFAULT).expect("fits");
        let parts: Vec<_> = chunks(&bytes).collect();
        assert_eq!(parts.len(), 3);
        assert!(a.add(parts[1].0, parts[1].1).is_err(), "out of order");
        assert_eq!(a.add(parts[0].0, parts[0].1), Ok(None));
        assert_eq!(a.add(parts[1].0, parts[1].1), Ok(None));
        assert_eq!(a.add(parts[2].0, parts[2].1), Ok(Some(bytes.clone())));

        // Wrong bytes under a hash, too large, past the end: refused.
        let mut a = Assembly::start(ModuleHash([0; 32]), 3, 100).expect("fits");
        assert!(a.add(0, b"abc").is_err());
        assert!(Assembly::start(hash, 101, 100).is_err());
        let mut a = Assembly::start(hash, 2, 100).expect("fits");
        assert!(a.add(0, b"abc").is_err());
    }

    #[test]
    fn every_import_signature_is_well_formed() {
        for (name, sig) in WASI_IMPORTS {
            let (params, results) = sig.split_once("->").expect(name);
            assert!(params.chars().all(|c| c == 'i' || c == 'I'), "{name}");
            assert!(results == "i" || results.is_empty(), "{name}");
        }
        assert_eq!(wasi_signature(WASI_MODULE, "fd_write"), Some("iiii->i"));
        assert_eq!(wasi_signature("env", "fd_write"), None);
    }
}
