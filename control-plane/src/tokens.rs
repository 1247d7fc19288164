//! The admin and join tokens: shared secrets in files.
//!
//! A token given with a flag is read from that file (it must exist). Without the flag, the
//! token lives in the data directory: generated on first start (random, mode 0600) and reused
//! afterwards, so `sinewctl` and sidecars on the same machine find it without configuration.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::path::Path;

/// Reads the token in `explicit` or, without one, reads or creates `default_path`.
pub fn load_or_create(explicit: Option<&Path>, default_path: &Path) -> anyhow::Result<String> {
    if let Some(path) = explicit {
        warn_if_readable_by_others(path);
        return read(path);
    }
    if default_path.exists() {
        // Ours: narrowed to 0600 in case an older version or a hand left it wider.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(default_path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| {
                    format!("cannot make {} private (0600)", default_path.display())
                })?;
        }
        return read(default_path);
    }
    let token = random_hex(32)?;
    write_private(default_path, &format!("{token}\n"))?;
    Ok(token)
}

/// A token file given by the operator is theirs to change; say so when others can read it.
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "token file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(token.to_string())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create token file {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write token file {}", path.display()))?;
    Ok(())
}

/// `bytes` bytes from the operating system's CSPRNG, as lowercase hex.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let buf = random_bytes(bytes).context("cannot generate a token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `n` bytes from the operating system's CSPRNG.
pub fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf))?;
    Ok(buf)
}

/// Compares a presented secret with the expected one in time that does not depend on where
/// they differ.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_with_private_mode() {
        let dir = std::env::temp_dir().join(format!(
            "sinew-tokens-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin-token");
        let first = load_or_create(None, &path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create(None, &path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let explicit = dir.join("mine");
        assert!(
            load_or_create(Some(&explicit), &path).is_err(),
            "explicit file must exist"
        );
        std::fs::write(&explicit, "  secret \n").unwrap();
        assert_eq!(load_or_create(Some(&explicit), &path).unwrap(), "secret");
        std::fs::write(&explicit, "\n").unwrap();
        assert!(load_or_create(Some(&explicit), &path).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
