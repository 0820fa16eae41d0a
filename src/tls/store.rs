//! The on-disk store: files are written atomically (temporary file in the same
//! directory, fsync, rename, fsync of the directory), so a crash mid-write never
//! leaves a half-written key where a working one was. Keys are 0600, store
//! directories 0700.
//!
//! A `state_dir` that exists but cannot be written (a read-only mount, a
//! full disk, wrong ownership) is not fatal: what is stored is served, and
//! what would be written is kept in memory only ([`open_state_dir`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and its parents, owner-only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Makes `state_dir` ready: created owner-only when missing (an error if
/// that fails: most likely a typo), else made owner-only if it is not (a
/// warning if that fails). The inner result says whether it can be written
/// now: `Err` names why not (a read-only file system, no space, not the
/// owner), and portcullis then runs on what is stored.
pub fn open_state_dir(dir: &Path) -> io::Result<io::Result<()>> {
    if !dir.is_dir() {
        create_private_dir(dir)?;
    } else if fs::metadata(dir)?.permissions().mode() & 0o777 != 0o700 {
        if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(state_dir = %dir.display(), error = %e, "cannot make state_dir owner-only (0700): keys in it may be readable by others");
        }
    }
    Ok(probe_writable(dir))
}

/// Whether a file can be created, written and removed in `dir` (as root,
/// permissions alone never say no: only trying does).
pub fn probe_writable(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    let written = write_atomic(&probe, b"portcullis\n", 0o600);
    let _ = fs::remove_file(&probe);
    written
}

/// Replaces `path` with `bytes` in one step; `mode` applies from the first byte.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_created_private_and_probed() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        assert!(open_state_dir(&state).unwrap().is_ok());
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(fs::read_dir(&state).unwrap().count(), 0, "no probe left");
        // Under a regular file it cannot exist: refused.
        let file = d.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(open_state_dir(&file.join("state")).is_err());
    }

    #[test]
    fn writes_replace_whole_files_with_the_given_mode() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key = dir.join("key.pem");
        write_atomic(&key, b"one", 0o600).unwrap();
        write_atomic(&key, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
