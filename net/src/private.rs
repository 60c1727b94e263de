//! Files private to their owner, whatever the umask: both shells keep
//! their stores and keys in a directory only their user can read.

/// Creates `dir` (and its parents) readable by its owner only (0700); an
/// existing directory is left as it is.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
