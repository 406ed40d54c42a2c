//! Durable file writes shared by the on-disk stores (identity, policy): write a temp file in
//! the same directory, fsync it, rename it over the target, fsync the directory — so a crash
//! leaves either the old or the new contents, never a torn file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically and durably with permission `mode`, creating the
/// parent directory. On failure returns the path that failed with the cause.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir).map_err(|e| (dir.clone(), e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| (tmp.clone(), e))?;
    f.write_all(contents).map_err(|e| (tmp.clone(), e))?;
    f.sync_all().map_err(|e| (tmp.clone(), e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| (path.to_owned(), e))?;
    // Makes the rename itself durable; best effort (some filesystems refuse to open dirs).
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
