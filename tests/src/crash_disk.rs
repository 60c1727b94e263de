//! A disk for crash tests: a redb storage backend that fails at the Nth
//! write or sync and forgets every write not yet synced, as power loss does.
//! The stores' crash tests place that failure at every point of a sequence
//! of operations and check what a reopened store holds.

use std::sync::{Arc, Mutex};

use redb::StorageBackend;

#[derive(Debug, Default)]
struct Disk {
    /// What survives a crash: the image as of the last sync.
    durable: Vec<u8>,
    /// What the running process sees.
    volatile: Vec<u8>,
    /// Operations left before the crash; `None` never crashes.
    ops_left: Option<u64>,
    ops_done: u64,
    crashed: bool,
}

/// A backend that crashes after N writes/syncs and forgets unsynced writes.
#[derive(Debug, Clone)]
pub struct CrashBackend(Arc<Mutex<Disk>>);

impl CrashBackend {
    pub fn new(durable: Vec<u8>, ops_left: Option<u64>) -> CrashBackend {
        CrashBackend(Arc::new(Mutex::new(Disk {
            volatile: durable.clone(),
            durable,
            ops_left,
            ..Disk::default()
        })))
    }

    fn tick(&self) -> std::io::Result<std::sync::MutexGuard<'_, Disk>> {
        let mut d = self.0.lock().expect("test lock");
        if d.crashed {
            return Err(std::io::Error::other("disk gone (injected crash)"));
        }
        if let Some(n) = d.ops_left.as_mut() {
            if *n == 0 {
                d.crashed = true;
                return Err(std::io::Error::other("injected crash"));
            }
            *n -= 1;
        }
        d.ops_done += 1;
        Ok(d)
    }

    pub fn durable_image(&self) -> Vec<u8> {
        self.0.lock().expect("test lock").durable.clone()
    }

    pub fn ops_done(&self) -> u64 {
        self.0.lock().expect("test lock").ops_done
    }
}

impl StorageBackend for CrashBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        let d = self.0.lock().expect("test lock");
        if d.crashed {
            return Err(std::io::Error::other("disk gone"));
        }
        Ok(d.volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let d = self.0.lock().expect("test lock");
        if d.crashed {
            return Err(std::io::Error::other("disk gone"));
        }
        let start = offset as usize;
        let src = d.volatile.get(start..start + out.len()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end")
        })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut d = self.tick()?;
        d.volatile.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut d = self.tick()?;
        d.durable = d.volatile.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut d = self.tick()?;
        let start = offset as usize;
        if d.volatile.len() < start + data.len() {
            d.volatile.resize(start + data.len(), 0);
        }
        d.volatile[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}
