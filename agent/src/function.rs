//! Functions: a task's WebAssembly module run in a sandbox (WASI preview 1
//! on the wasmi interpreter).
//!
//! Isolation: a function runs in a child process of the agent binary
//! (`sundial-agent function-run`, see [`runner_main`]), never in the agent
//! itself, so a runaway function, a memory bomb or a fault inside the
//! interpreter ends that child only. The child lowers its own priority
//! (SCHED_IDLE, else nice 19) so that functions spinning on every core leave the agent's
//! firing the CPU it needs; the agent kills it at the task's timeout as it
//! kills a program. Everything the child needs comes on its stdin
//! ([`RunnerInput`]), so nothing of the task's environment reaches the
//! child's own (a `LD_PRELOAD` there is the function's data, nothing more).
//!
//! What a function can reach: its arguments, its environment, stdout and
//! stderr (kept as a run's tails), clocks, randomness, sleeping, and the
//! directories the device owner opened to functions (`--allow-wasm-dir`),
//! under their own paths: files there can be read, written and created,
//! never a path outside (every open is resolved by the kernel with
//! `RESOLVE_BENEATH`). No network, no other files, no processes; the WASI
//! functions for those answer with an error code.
//!
//! Limits that always hold: fuel (about one unit per instruction), the
//! linear memory cap (a grow past it traps), the interpreter's call stack,
//! and the timeout (the agent's). How a run stopped reaches the agent as a
//! last stderr line marked with a per-run nonce the function cannot know
//! ([`RunnerInput::nonce`]), so a function cannot forge its own verdict.

// `stat` fields have other types on other targets: the casts stay.
#![allow(clippy::unnecessary_cast)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use sundial_protocol::wasm::{ModuleHash, MODULE_BYTES_LIMIT, WASI_IMPORTS, WASI_MODULE};
use wasmi::{
    Caller, CompilationMode, Config, Engine, Extern, FuncType, Linker, Memory, Module, Store,
    StoreLimits, StoreLimitsBuilder, TrapCode, Val, ValType,
};

/// What the agent hands its function runner, on the runner's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerInput {
    pub module: Vec<u8>,
    pub sha256: ModuleHash,
    /// `argv[0]`.
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub fuel: u64,
    pub memory_bytes: u64,
    /// Directories opened to the function, under their own paths.
    pub dirs: Vec<String>,
    /// Marks the runner's verdict line on stderr.
    pub nonce: String,
    /// The longest one sleep of the function may last, ms (the task's
    /// timeout ends a longer wait anyway; fuzzing sets it short).
    pub sleep_ms_max: u64,
}

/// The most a runner reads from its stdin.
pub const RUNNER_INPUT_BYTES_MAX: u64 = MODULE_BYTES_LIMIT + 16 * 1024 * 1024;
/// The runner's exit code when it stopped the function (its verdict line
/// says why); a function's own exit code is passed on (above 255: 255).
pub const STOPPED_EXIT_CODE: i32 = 125;

/// How a function ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It returned (0) or called `proc_exit`.
    Exited(i32),
    /// The runtime stopped it, or it could not start: why.
    Stopped(String),
}

/// The line a runner writes last on stderr when it stopped the function.
pub fn verdict_line(nonce: &str, why: &str) -> String {
    format!("\n[sundial {nonce}] {why}\n")
}

/// The stopped verdict in `stderr` (the tail of a runner's stderr), and
/// the tail without it.
pub fn take_verdict(stderr: &mut Vec<u8>, nonce: &str) -> Option<String> {
    let mark = format!("\n[sundial {nonce}] ");
    let at = stderr
        .windows(mark.len())
        .rposition(|w| w == mark.as_bytes())?;
    let why = String::from_utf8_lossy(&stderr[at + mark.len()..])
        .trim_end()
        .to_string();
    stderr.truncate(at);
    Some(why)
}

// ---- WASI errno values (preview 1)
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const EIO: i32 = 29;
const ENOSYS: i32 = 52;
const ESPIPE: i32 = 70;
const ENOTCAPABLE: i32 = 76;

/// A host errno for WASI.
fn errno_of(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc_errno) => match libc_errno {
            1 => 63,  // EPERM
            2 => 44,  // ENOENT
            5 => EIO, // EIO
            9 => EBADF,
            13 => 2,           // EACCES
            17 => 20,          // EEXIST
            18 => ENOTCAPABLE, // EXDEV: RESOLVE_BENEATH refused a path outside
            20 => 54,          // ENOTDIR
            21 => 31,          // EISDIR
            22 => EINVAL,
            27 => 22, // EFBIG
            28 => 51, // ENOSPC
            30 => 69, // EROFS
            36 => 37, // ENAMETOOLONG
            39 => 55, // ENOTEMPTY
            40 => 32, // ELOOP
            _ => EIO,
        },
        None => EIO,
    }
}

enum Fd {
    Stdin,
    Stdout,
    Stderr,
    Preopen { path: String, dir: OwnedFd },
    File(std::fs::File),
    Dir(OwnedFd),
}

struct Host {
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    fds: Vec<Option<Fd>>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    limits: StoreLimits,
    started: Instant,
    sleep_max: Duration,
}

impl Host {
    fn fd(&mut self, fd: i32) -> Option<&mut Fd> {
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.fds.get_mut(i))
            .and_then(Option::as_mut)
    }
}

type Cx<'a> = Caller<'a, Host>;

fn memory(caller: &Cx<'_>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

fn range(data: &[u8], ptr: i32, len: usize) -> Result<std::ops::Range<usize>, i32> {
    let start = u32::try_from(ptr).map_err(|_| EFAULT)? as usize;
    let end = start.checked_add(len).ok_or(EFAULT)?;
    if end > data.len() {
        return Err(EFAULT);
    }
    Ok(start..end)
}

fn get_u32(data: &[u8], ptr: i32) -> Result<u32, i32> {
    let r = range(data, ptr, 4)?;
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[r]);
    Ok(u32::from_le_bytes(b))
}

fn get_u64(data: &[u8], ptr: i32) -> Result<u64, i32> {
    let r = range(data, ptr, 8)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[r]);
    Ok(u64::from_le_bytes(b))
}

fn put(data: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let r = range(data, ptr, bytes.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

fn at(ptr: i32, offset: u32) -> i32 {
    (ptr as u32).wrapping_add(offset) as i32
}

/// Runs `f` with the memory and host state; its errno as the result.
fn with_mem(caller: &mut Cx<'_>, f: impl FnOnce(&mut [u8], &mut Host) -> Result<(), i32>) -> i32 {
    let Some(mem) = memory(caller) else {
        return EFAULT;
    };
    let (data, host) = mem.data_and_store_mut(caller);
    match f(data, host) {
        Ok(()) => ESUCCESS,
        Err(e) => e,
    }
}

/// The (ptr, len) pairs of an iovec array.
fn iovecs(data: &[u8], iovs: i32, n: i32) -> Result<Vec<(i32, usize)>, i32> {
    let n = u32::try_from(n).map_err(|_| EINVAL)?;
    if n > 1024 {
        return Err(EINVAL);
    }
    (0..n)
        .map(|i| {
            let base = at(iovs, i * 8);
            Ok((
                get_u32(data, base)? as i32,
                get_u32(data, at(base, 4))? as usize,
            ))
        })
        .collect()
}

/// WASI filetype of a host file mode.
fn filetype(mode: u32) -> u8 {
    match mode & 0o170000 {
        0o100000 => 4, // regular file
        0o040000 => 3, // directory
        0o120000 => 7, // symbolic link
        0o020000 => 2, // character device
        0o060000 => 1, // block device
        0o140000 => 6, // socket
        _ => 0,
    }
}

fn filestat(fd: &impl std::os::fd::AsFd) -> Result<[u8; 64], i32> {
    let st = rustix::fs::fstat(fd).map_err(|e| errno_of(&e.into()))?;
    let ns = |s: i64, n: i64| {
        (s.max(0) as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(n.max(0) as u64)
    };
    let mut out = [0u8; 64];
    out[0..8].copy_from_slice(&(st.st_dev as u64).to_le_bytes());
    out[8..16].copy_from_slice(&(st.st_ino as u64).to_le_bytes());
    out[16] = filetype(st.st_mode as u32);
    out[24..32].copy_from_slice(&(st.st_nlink as u64).to_le_bytes());
    out[32..40].copy_from_slice(&(st.st_size.max(0) as u64).to_le_bytes());
    out[40..48].copy_from_slice(&ns(st.st_atime as i64, st.st_atime_nsec as i64).to_le_bytes());
    out[48..56].copy_from_slice(&ns(st.st_mtime as i64, st.st_mtime_nsec as i64).to_le_bytes());
    out[56..64].copy_from_slice(&ns(st.st_ctime as i64, st.st_ctime_nsec as i64).to_le_bytes());
    Ok(out)
}

/// Opens `path` under the directory `fd`, never outside it.
fn open_beneath(host: &mut Host, fd: i32, path: &str, flags: OFlags) -> Result<OwnedFd, i32> {
    let dir = match host.fd(fd) {
        Some(Fd::Preopen { dir, .. }) | Some(Fd::Dir(dir)) => dir,
        Some(_) => return Err(54), // ENOTDIR
        None => return Err(EBADF),
    };
    // openat2 takes a mode only with O_CREAT.
    let mode = if flags.contains(OFlags::CREATE) {
        Mode::from_raw_mode(0o644)
    } else {
        Mode::empty()
    };
    rustix::fs::openat2(
        &*dir,
        path,
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        // A kernel without openat2 (before Linux 5.6): nothing is opened
        // rather than opened unchecked.
        rustix::io::Errno::NOSYS => ENOTCAPABLE,
        e => errno_of(&e.into()),
    })
}

fn path_of(data: &[u8], ptr: i32, len: i32) -> Result<String, i32> {
    let len = usize::try_from(len).map_err(|_| EINVAL)?;
    if len > 4096 {
        return Err(37); // ENAMETOOLONG
    }
    let r = range(data, ptr, len)?;
    String::from_utf8(data[r].to_vec()).map_err(|_| 84) // EILSEQ
}

fn add_fd(host: &mut Host, fd: Fd) -> Result<u32, i32> {
    if let Some(i) = host.fds.iter().position(Option::is_none) {
        host.fds[i] = Some(fd);
        return Ok(i as u32);
    }
    if host.fds.len() >= 1024 {
        return Err(33); // EMFILE
    }
    host.fds.push(Some(fd));
    Ok((host.fds.len() - 1) as u32)
}

fn clock_ns(host: &Host, id: i32) -> Result<u64, i32> {
    match id {
        0 => Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)),
        1..=3 => Ok(host.started.elapsed().as_nanos() as u64),
        _ => Err(EINVAL),
    }
}

/// An import that answers with an error code: the capability is not given.
fn refuse(linker: &mut Linker<Host>, name: &str, sig: &str, errno: i32) -> Result<(), String> {
    let (params, results) = sig.split_once("->").unwrap_or((sig, ""));
    let ty = |c: char| if c == 'I' { ValType::I64 } else { ValType::I32 };
    let params: Vec<ValType> = params.chars().map(ty).collect();
    let results: Vec<ValType> = results.chars().map(ty).collect();
    let func_ty = FuncType::new(params, results);
    linker
        .func_new(
            WASI_MODULE,
            name,
            func_ty,
            move |_c, _p, out: &mut [Val]| {
                if let Some(r) = out.first_mut() {
                    *r = Val::I32(errno);
                }
                Ok(())
            },
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The WASI functions [`link`] gives a real implementation; the rest of
/// [`WASI_IMPORTS`] answer with an error code.
const PROVIDED: &[&str] = &[
    "args_sizes_get",
    "args_get",
    "environ_sizes_get",
    "environ_get",
    "clock_res_get",
    "clock_time_get",
    "random_get",
    "sched_yield",
    "proc_exit",
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_sync",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_filestat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_seek",
    "fd_tell",
    "path_open",
    "path_filestat_get",
    "poll_oneoff",
];

fn link(linker: &mut Linker<Host>) -> Result<(), wasmi::Error> {
    let w = WASI_MODULE;
    linker.func_wrap(
        w,
        "args_sizes_get",
        |mut c: Cx<'_>, argc: i32, size: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let n = h.args.len() as u32;
                let bytes: usize = h.args.iter().map(Vec::len).sum();
                put(data, argc, &n.to_le_bytes())?;
                put(data, size, &(bytes as u32).to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(w, "args_get", |mut c: Cx<'_>, argv: i32, buf: i32| -> i32 {
        with_mem(&mut c, |data, h| strings(data, &h.args, argv, buf))
    })?;
    linker.func_wrap(
        w,
        "environ_sizes_get",
        |mut c: Cx<'_>, count: i32, size: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let n = h.env.len() as u32;
                let bytes: usize = h.env.iter().map(Vec::len).sum();
                put(data, count, &n.to_le_bytes())?;
                put(data, size, &(bytes as u32).to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        w,
        "environ_get",
        |mut c: Cx<'_>, env: i32, buf: i32| -> i32 {
            with_mem(&mut c, |data, h| strings(data, &h.env, env, buf))
        },
    )?;
    linker.func_wrap(
        w,
        "clock_res_get",
        |mut c: Cx<'_>, id: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, _| {
                if !(0..=3).contains(&id) {
                    return Err(EINVAL);
                }
                put(data, out, &1_000u64.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        w,
        "clock_time_get",
        |mut c: Cx<'_>, id: i32, _precision: i64, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                put(data, out, &clock_ns(h, id)?.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        w,
        "random_get",
        |mut c: Cx<'_>, buf: i32, len: i32| -> i32 {
            with_mem(&mut c, |data, _| {
                let r = range(data, buf, usize::try_from(len).map_err(|_| EINVAL)?)?;
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data[r])
                    .map_err(|_| EIO)
            })
        },
    )?;
    linker.func_wrap(w, "sched_yield", || -> i32 { ESUCCESS })?;
    linker.func_wrap(w, "proc_exit", |code: i32| -> Result<(), wasmi::Error> {
        Err(wasmi::Error::i32_exit(code))
    })?;
    linker.func_wrap(
        w,
        "fd_write",
        |mut c: Cx<'_>, fd: i32, iovs: i32, n: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let mut written = 0usize;
                for (ptr, len) in iovecs(data, iovs, n)? {
                    let r = range(data, ptr, len)?;
                    let bytes = &data[r];
                    let res = match h.fd(fd) {
                        Some(Fd::Stdout) => h.stdout.write_all(bytes),
                        Some(Fd::Stderr) => h.stderr.write_all(bytes),
                        Some(Fd::File(f)) => f.write_all(bytes),
                        Some(_) => return Err(EBADF),
                        None => return Err(EBADF),
                    };
                    res.map_err(|e| errno_of(&e))?;
                    written += len;
                }
                put(data, out, &(written as u32).to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        w,
        "fd_read",
        |mut c: Cx<'_>, fd: i32, iovs: i32, n: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let mut read = 0usize;
                for (ptr, len) in iovecs(data, iovs, n)? {
                    let r = range(data, ptr, len)?;
                    let got = match h.fd(fd) {
                        Some(Fd::Stdin) => 0,
                        Some(Fd::File(f)) => f.read(&mut data[r]).map_err(|e| errno_of(&e))?,
                        Some(Fd::Dir(_)) | Some(Fd::Preopen { .. }) => return Err(31), // EISDIR
                        _ => return Err(EBADF),
                    };
                    read += got;
                    if got < len {
                        break;
                    }
                }
                put(data, out, &(read as u32).to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(w, "fd_close", |mut c: Cx<'_>, fd: i32| -> i32 {
        let h = c.data_mut();
        let Some(slot) = usize::try_from(fd).ok().and_then(|i| h.fds.get_mut(i)) else {
            return EBADF;
        };
        match slot {
            Some(Fd::File(_) | Fd::Dir(_)) => {
                *slot = None;
                ESUCCESS
            }
            // The standard streams and the owner's directories stay.
            Some(_) => ESUCCESS,
            None => EBADF,
        }
    })?;
    linker.func_wrap(w, "fd_sync", |mut c: Cx<'_>, fd: i32| -> i32 {
        sync(c.data_mut(), fd)
    })?;
    linker.func_wrap(w, "fd_datasync", |mut c: Cx<'_>, fd: i32| -> i32 {
        sync(c.data_mut(), fd)
    })?;
    linker.func_wrap(
        w,
        "fd_fdstat_get",
        |mut c: Cx<'_>, fd: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let (kind, flags) = match h.fd(fd) {
                    Some(Fd::Stdin | Fd::Stdout | Fd::Stderr) => (2u8, 0u16),
                    Some(Fd::Preopen { .. } | Fd::Dir(_)) => (3, 0),
                    Some(Fd::File(_)) => (4, 0),
                    None => return Err(EBADF),
                };
                let mut stat = [0u8; 24];
                stat[0] = kind;
                stat[2..4].copy_from_slice(&flags.to_le_bytes());
                stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                stat[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                put(data, out, &stat)
            })
        },
    )?;
    linker.func_wrap(
        w,
        "fd_fdstat_set_flags",
        |mut c: Cx<'_>, fd: i32, _flags: i32| -> i32 {
            if c.data_mut().fd(fd).is_some() {
                ESUCCESS
            } else {
                EBADF
            }
        },
    )?;
    linker.func_wrap(
        w,
        "fd_filestat_get",
        |mut c: Cx<'_>, fd: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let stat = match h.fd(fd) {
                    Some(Fd::File(f)) => filestat(f)?,
                    Some(Fd::Dir(d)) | Some(Fd::Preopen { dir: d, .. }) => filestat(d)?,
                    Some(_) => {
                        let mut s = [0u8; 64];
                        s[16] = 2;
                        s
                    }
                    None => return Err(EBADF),
                };
                put(data, out, &stat)
            })
        },
    )?;
    linker.func_wrap(
        w,
        "fd_prestat_get",
        |mut c: Cx<'_>, fd: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let Some(Fd::Preopen { path, .. }) = h.fd(fd) else {
                    return Err(EBADF);
                };
                let mut pre = [0u8; 8];
                pre[4..8].copy_from_slice(&(path.len() as u32).to_le_bytes());
                put(data, out, &pre)
            })
        },
    )?;
    linker.func_wrap(
        w,
        "fd_prestat_dir_name",
        |mut c: Cx<'_>, fd: i32, buf: i32, len: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let Some(Fd::Preopen { path, .. }) = h.fd(fd) else {
                    return Err(EBADF);
                };
                let bytes = path.as_bytes();
                if usize::try_from(len).map_err(|_| EINVAL)? < bytes.len() {
                    return Err(EINVAL);
                }
                put(data, buf, bytes)
            })
        },
    )?;
    linker.func_wrap(
        w,
        "fd_seek",
        |mut c: Cx<'_>, fd: i32, offset: i64, whence: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let Some(Fd::File(f)) = h.fd(fd) else {
                    return Err(if h.fd(fd).is_some() { ESPIPE } else { EBADF });
                };
                let pos = match whence {
                    0 => std::io::SeekFrom::Start(u64::try_from(offset).map_err(|_| EINVAL)?),
                    1 => std::io::SeekFrom::Current(offset),
                    2 => std::io::SeekFrom::End(offset),
                    _ => return Err(EINVAL),
                };
                let at = std::io::Seek::seek(f, pos).map_err(|e| errno_of(&e))?;
                put(data, out, &at.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(w, "fd_tell", |mut c: Cx<'_>, fd: i32, out: i32| -> i32 {
        with_mem(&mut c, |data, h| {
            let Some(Fd::File(f)) = h.fd(fd) else {
                return Err(if h.fd(fd).is_some() { ESPIPE } else { EBADF });
            };
            let at = std::io::Seek::stream_position(f).map_err(|e| errno_of(&e))?;
            put(data, out, &at.to_le_bytes())
        })
    })?;
    linker.func_wrap(
        w,
        "path_open",
        |mut c: Cx<'_>,
         fd: i32,
         lookup: i32,
         path: i32,
         path_len: i32,
         oflags: i32,
         rights: i64,
         _inherit: i64,
         fdflags: i32,
         out: i32|
         -> i32 {
            with_mem(&mut c, |data, h| {
                let path = path_of(data, path, path_len)?;
                let read = rights & (1 << 1) != 0;
                let write = rights & ((1 << 6) | (1 << 4)) != 0 || oflags & (1 | 8) != 0;
                let mut flags = match (read, write) {
                    (_, false) => OFlags::RDONLY,
                    (false, true) => OFlags::WRONLY,
                    (true, true) => OFlags::RDWR,
                };
                if oflags & 1 != 0 {
                    flags |= OFlags::CREATE;
                }
                if oflags & 2 != 0 {
                    flags = OFlags::DIRECTORY | OFlags::RDONLY;
                }
                if oflags & 4 != 0 {
                    flags |= OFlags::EXCL;
                }
                if oflags & 8 != 0 {
                    flags |= OFlags::TRUNC;
                }
                if fdflags & 1 != 0 {
                    flags |= OFlags::APPEND;
                }
                if lookup & 1 == 0 {
                    flags |= OFlags::NOFOLLOW;
                }
                let opened = open_beneath(h, fd, &path, flags)?;
                let is_dir = rustix::fs::fstat(&opened)
                    .map(|s| filetype(s.st_mode as u32) == 3)
                    .unwrap_or(false);
                let new = if is_dir {
                    Fd::Dir(opened)
                } else {
                    Fd::File(std::fs::File::from(opened))
                };
                let n = add_fd(h, new)?;
                put(data, out, &n.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        w,
        "path_filestat_get",
        |mut c: Cx<'_>, fd: i32, lookup: i32, path: i32, path_len: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| {
                let path = path_of(data, path, path_len)?;
                let mut flags = OFlags::PATH;
                if lookup & 1 == 0 {
                    flags |= OFlags::NOFOLLOW;
                }
                let opened = open_beneath(h, fd, &path, flags)?;
                put(data, out, &filestat(&opened)?)
            })
        },
    )?;
    linker.func_wrap(
        w,
        "poll_oneoff",
        |mut c: Cx<'_>, subs: i32, events: i32, n: i32, out: i32| -> i32 {
            with_mem(&mut c, |data, h| poll(data, h, subs, events, n, out))
        },
    )?;
    Ok(())
}

fn sync(h: &mut Host, fd: i32) -> i32 {
    match h.fd(fd) {
        Some(Fd::File(f)) => f.sync_all().map_or_else(|e| errno_of(&e), |_| ESUCCESS),
        Some(_) => ESUCCESS,
        None => EBADF,
    }
}

/// Writes `list` as C strings into `buf`, their addresses into `ptrs`.
fn strings(data: &mut [u8], list: &[Vec<u8>], ptrs: i32, buf: i32) -> Result<(), i32> {
    let mut offset = 0u32;
    for (i, s) in list.iter().enumerate() {
        let addr = at(buf, offset);
        put(data, at(ptrs, 4 * i as u32), &(addr as u32).to_le_bytes())?;
        put(data, addr, s)?;
        offset = offset.checked_add(s.len() as u32).ok_or(EFAULT)?;
    }
    Ok(())
}

/// `poll_oneoff`: clock subscriptions sleep (the timeout still holds);
/// descriptor subscriptions are ready at once.
fn poll(
    data: &mut [u8],
    h: &mut Host,
    subs: i32,
    events: i32,
    n: i32,
    out: i32,
) -> Result<(), i32> {
    let n = u32::try_from(n).map_err(|_| EINVAL)?;
    if n == 0 || n > 64 {
        return Err(EINVAL);
    }
    let mut ready = Vec::new();
    let mut sleep: Option<(u64, u64)> = None;
    for i in 0..n {
        let s = at(subs, i * 48);
        let userdata = get_u64(data, s)?;
        let tag = *data.get(range(data, at(s, 8), 1)?.start).ok_or(EFAULT)?;
        match tag {
            0 => {
                let id = get_u32(data, at(s, 16))? as i32;
                let timeout = get_u64(data, at(s, 24))?;
                let flags = get_u32(data, at(s, 40))? & 0xffff;
                let wait = if flags & 1 != 0 {
                    timeout.saturating_sub(clock_ns(h, id)?)
                } else {
                    timeout
                };
                if sleep.is_none_or(|(w, _)| wait < w) {
                    sleep = Some((wait, userdata));
                }
            }
            1 | 2 => ready.push((userdata, tag)),
            _ => return Err(EINVAL),
        }
    }
    let mut written: Vec<(u64, u8)> = ready;
    if written.is_empty() {
        if let Some((wait, userdata)) = sleep {
            std::thread::sleep(Duration::from_nanos(wait).min(h.sleep_max));
            written.push((userdata, 0));
        }
    }
    for (i, (userdata, kind)) in written.iter().enumerate() {
        let mut ev = [0u8; 32];
        ev[0..8].copy_from_slice(&userdata.to_le_bytes());
        ev[10] = *kind;
        put(data, at(events, 32 * i as u32), &ev)?;
    }
    put(data, out, &(written.len() as u32).to_le_bytes())
}

/// Runs a function to its end, its output to `stdout` and `stderr`.
pub fn run(
    input: RunnerInput,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
) -> Verdict {
    if ModuleHash::of(&input.module) != input.sha256 {
        return Verdict::Stopped(format!(
            "module {} arrived damaged (its bytes do not have that SHA-256)",
            input.sha256.short()
        ));
    }
    let mut config = Config::default();
    config
        .consume_fuel(true)
        .compilation_mode(CompilationMode::LazyTranslation);
    let engine = Engine::new(&config);
    let module = match Module::new(&engine, &input.module) {
        Ok(m) => m,
        Err(e) => return Verdict::Stopped(format!("the module does not load: {e}")),
    };
    let mut fds = vec![Some(Fd::Stdin), Some(Fd::Stdout), Some(Fd::Stderr)];
    for dir in &input.dirs {
        match rustix::fs::open(
            dir.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(d) => fds.push(Some(Fd::Preopen {
                path: dir.clone(),
                dir: d,
            })),
            Err(e) => {
                return Verdict::Stopped(format!(
                "the directory {dir} opened to functions (--allow-wasm-dir) cannot be opened: {e}"
            ))
            }
        }
    }
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.retain(|b| *b != 0);
        v.push(0);
        v
    };
    let memory_cap = usize::try_from(input.memory_bytes).unwrap_or(usize::MAX);
    let host = Host {
        args: std::iter::once(input.name.as_str())
            .chain(input.args.iter().map(String::as_str))
            .map(cstr)
            .collect(),
        env: input
            .env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect(),
        fds,
        stdout,
        stderr,
        limits: StoreLimitsBuilder::new()
            .memory_size(memory_cap)
            .table_elements(100_000)
            .instances(1)
            .memories(1)
            .tables(4)
            .trap_on_grow_failure(true)
            .build(),
        started: Instant::now(),
        sleep_max: Duration::from_millis(input.sleep_ms_max),
    };
    let mut store = Store::new(&engine, host);
    store.limiter(|h| &mut h.limits);
    if let Err(e) = store.set_fuel(input.fuel) {
        return Verdict::Stopped(format!("fuel could not be set: {e}"));
    }
    let mut linker = Linker::<Host>::new(&engine);
    if let Err(e) = link(&mut linker) {
        return Verdict::Stopped(format!("the sandbox could not be set up: {e}"));
    }
    for (name, sig) in WASI_IMPORTS {
        if !PROVIDED.contains(name) {
            let errno = if name.starts_with("sock_") || name.starts_with("proc_raise") {
                ENOSYS
            } else {
                ENOTCAPABLE
            };
            if let Err(e) = refuse(&mut linker, name, sig, errno) {
                return Verdict::Stopped(format!("the sandbox could not be set up: {e}"));
            }
        }
    }
    let stopped = |e: wasmi::Error, fuel: u64, memory: u64| -> Verdict {
        if let Some(code) = e.i32_exit_status() {
            return Verdict::Exited(code);
        }
        Verdict::Stopped(match e.as_trap_code() {
            Some(TrapCode::OutOfFuel) => {
                format!("fuel exhausted after {} instructions", group(fuel))
            }
            Some(TrapCode::GrowthOperationLimited) => format!(
                "memory limit of {} reached",
                sundial_protocol::wasm::show_bytes(memory)
            ),
            Some(TrapCode::StackOverflow) => "trap: call stack exhausted".into(),
            Some(t) => format!("trap: {t}"),
            None => format!("stopped: {e}"),
        })
    };
    let instance = match linker.instantiate_and_start(&mut store, &module) {
        Ok(i) => i,
        Err(e) => {
            if e.as_trap_code().is_some() || e.i32_exit_status().is_some() {
                return stopped(e, input.fuel, input.memory_bytes);
            }
            return Verdict::Stopped(format!("the module could not be instantiated: {e}"));
        }
    };
    let start = match instance.get_typed_func::<(), ()>(&store, "_start") {
        Ok(f) => f,
        Err(_) => {
            return Verdict::Stopped("the module exports no `_start` function".into());
        }
    };
    let result = start.call(&mut store, ());
    let h = store.data_mut();
    let _ = h.stdout.flush();
    let _ = h.stderr.flush();
    match result {
        Ok(()) => Verdict::Exited(0),
        Err(e) => stopped(e, input.fuel, input.memory_bytes),
    }
}

/// `10000000` as `10,000,000`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `sundial-agent function-run`: reads a [`RunnerInput`] on stdin, runs
/// the function with its output on this process's stdout and stderr, and
/// exits with its exit code, or [`STOPPED_EXIT_CODE`] after the verdict
/// line when the runtime stopped it.
pub fn runner_main() -> std::process::ExitCode {
    // The lowest priority: functions spinning on every core leave the
    // agent (and the device's other work) the CPU whenever it wants it.
    // SCHED_IDLE runs only when nothing else wants the CPU; where it is not
    // available (an old kernel, a seccomp filter), nice 19.
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };
    let _ = rustix::process::setpriority_process(None, 19);
    let _ = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    let mut raw = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(RUNNER_INPUT_BYTES_MAX + 1)
        .read_to_end(&mut raw);
    let input: RunnerInput = match read
        .map_err(|e| e.to_string())
        .and_then(|_| postcard::from_bytes(&raw).map_err(|e| e.to_string()))
    {
        Ok(i) => i,
        Err(e) => {
            eprintln!("sundial-agent function-run: this is run by the agent for a function, with its input on stdin ({e})");
            return std::process::ExitCode::from(2);
        }
    };
    drop(raw);
    let nonce = input.nonce.clone();
    match run(
        input,
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
    ) {
        Verdict::Exited(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Verdict::Stopped(why) => {
            let _ = std::io::stderr().write_all(verdict_line(&nonce, &why).as_bytes());
            std::process::ExitCode::from(STOPPED_EXIT_CODE as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Sink {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("sink")).into_owned()
        }
    }

    fn input(wat_text: &str) -> RunnerInput {
        let module = wat::parse_str(wat_text).expect("valid WAT");
        RunnerInput {
            sha256: ModuleHash::of(&module),
            module,
            name: "fn".into(),
            args: vec!["one".into(), "two".into()],
            env: vec![("TASK_GREETING".into(), "hello".into())],
            fuel: 10_000_000,
            memory_bytes: 1 << 20,
            dirs: Vec::new(),
            nonce: "n0nce".into(),
            sleep_ms_max: 1_000,
        }
    }

    fn go(i: RunnerInput) -> (Verdict, String, String) {
        let (out, err) = (Sink::default(), Sink::default());
        let v = run(i, Box::new(out.clone()), Box::new(err.clone()));
        (v, out.text(), err.text())
    }

    /// Prints its arguments and environment, NUL-separated, then exits 3.
    const ECHO: &str = r#"(module
      (import "wasi_snapshot_preview1" "args_sizes_get" (func $asz (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "args_get" (func $aget (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "environ_sizes_get" (func $esz (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "environ_get" (func $eget (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (drop (call $asz (i32.const 0) (i32.const 4)))
        (drop (call $aget (i32.const 100) (i32.const 1000)))
        ;; iovec at 16: the argument bytes
        (i32.store (i32.const 16) (i32.const 1000))
        (i32.store (i32.const 20) (i32.load (i32.const 4)))
        (drop (call $w (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 8)))
        (drop (call $esz (i32.const 0) (i32.const 4)))
        (drop (call $eget (i32.const 200) (i32.const 2000)))
        (i32.store (i32.const 16) (i32.const 2000))
        (i32.store (i32.const 20) (i32.load (i32.const 4)))
        (drop (call $w (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 8)))
        (call $exit (i32.const 3))))"#;

    #[test]
    fn arguments_and_environment_reach_the_function_and_its_exit_code_comes_back() {
        let (v, out, err) = go(input(ECHO));
        assert_eq!(v, Verdict::Exited(3));
        assert_eq!(out, "fn\0one\0two\0");
        assert_eq!(err, "TASK_GREETING=hello\0");
    }

    #[test]
    fn fuel_memory_and_traps_stop_a_function_with_the_reason() {
        let spin = r#"(module (memory (export "memory") 1)
          (func (export "_start") (loop $l (br $l))))"#;
        let (v, _, _) = go(input(spin));
        assert_eq!(
            v,
            Verdict::Stopped("fuel exhausted after 10,000,000 instructions".into())
        );

        let bomb = r#"(module (memory (export "memory") 1)
          (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#;
        let (v, _, _) = go(input(bomb));
        assert_eq!(v, Verdict::Stopped("memory limit of 1 MiB reached".into()));

        let trap = r#"(module (memory (export "memory") 1)
          (func (export "_start") (drop (i32.div_u (i32.const 1) (i32.const 0)))))"#;
        let (v, _, _) = go(input(trap));
        assert!(
            matches!(&v, Verdict::Stopped(w) if w.starts_with("trap: ") && w.contains("divi")),
            "{v:?}"
        );

        let deep = r#"(module (memory (export "memory") 1)
          (func $f (call $f)) (func (export "_start") (call $f)))"#;
        let (v, _, _) = go(input(deep));
        assert_eq!(v, Verdict::Stopped("trap: call stack exhausted".into()));

        let mut damaged = input(spin);
        damaged.module.push(0);
        assert!(matches!(go(damaged).0, Verdict::Stopped(w) if w.contains("damaged")));
    }

    #[test]
    fn a_preopened_directory_is_reachable_and_nothing_outside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inside = dir.path().join("in");
        std::fs::create_dir(&inside).expect("dir");
        std::fs::write(inside.join("data.txt"), "inside data").expect("write");
        std::fs::write(dir.path().join("secret.txt"), "outside").expect("write");
        // Opens the path at 300 under fd 3 and copies what it reads to
        // stdout; the open's errno goes to the exit code.
        let reader = |path: &str| {
            format!(
                r#"(module
              (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 300) "{path}")
              (func (export "_start") (local $e i32)
                (local.set $e (call $open (i32.const 3) (i32.const 1) (i32.const 300) (i32.const {len})
                  (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 0)))
                (if (local.get $e) (then (call $exit (local.get $e))))
                (i32.store (i32.const 16) (i32.const 1000))
                (i32.store (i32.const 20) (i32.const 100))
                (drop (call $read (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 8)))
                (i32.store (i32.const 20) (i32.load (i32.const 8)))
                (drop (call $w (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 8)))))"#,
                len = path.len()
            )
        };
        let with_dir = |path: &str| {
            let mut i = input(&reader(path));
            i.dirs = vec![inside.display().to_string()];
            i
        };
        let (v, out, _) = go(with_dir("data.txt"));
        assert_eq!((v, out.as_str()), (Verdict::Exited(0), "inside data"));
        for escape in ["../secret.txt", "/etc/passwd"] {
            let (v, out, _) = go(with_dir(escape));
            assert_eq!(v, Verdict::Exited(ENOTCAPABLE), "{escape}");
            assert_eq!(out, "");
        }
        // A symbolic link out of the directory is refused too.
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), inside.join("link"))
            .expect("symlink");
        let (v, out, _) = go(with_dir("link"));
        assert_eq!(v, Verdict::Exited(ENOTCAPABLE));
        assert_eq!(out, "");
        // Without a preopened directory, fd 3 is nothing.
        let (v, _, _) = go(input(&reader("data.txt")));
        assert_eq!(v, Verdict::Exited(EBADF));
    }

    #[test]
    fn verdict_lines_are_found_only_with_their_nonce() {
        let mut err = b"some output\nmore".to_vec();
        err.extend_from_slice(
            verdict_line("abc", "fuel exhausted after 5 instructions").as_bytes(),
        );
        let mut forged = err.clone();
        assert_eq!(take_verdict(&mut forged, "xyz"), None);
        assert_eq!(
            take_verdict(&mut err, "abc").as_deref(),
            Some("fuel exhausted after 5 instructions")
        );
        assert_eq!(err, b"some output\nmore");
    }
}
