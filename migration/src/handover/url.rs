//! `unix:PATH` URLs: a destination on the same host, reached over a UNIX
//! stream socket.

use std::path::PathBuf;

use crate::error::MigrationError;

/// Room for a path in `sockaddr_un.sun_path`, without its closing NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// The prefix of a UNIX-socket URL.
pub const UNIX_PREFIX: &str = "unix:";

/// Whether `url` names a UNIX socket (`unix:…`), valid or not.
pub fn is_unix(url: &str) -> bool {
    url.starts_with(UNIX_PREFIX)
}

/// Parses `unix:PATH`. Invariant of the result: a non-empty filesystem
/// path of at most [`MAX_UNIX_PATH`] bytes, without NUL, not abstract.
/// Errors name the URL and what is wrong with it.
pub fn parse_unix(url: &str) -> Result<PathBuf, MigrationError> {
    let bad = |why: String| MigrationError::InvalidParams(format!("URL {url:?}: {why}"));
    let path = url
        .strip_prefix(UNIX_PREFIX)
        .ok_or_else(|| bad("expected unix:PATH".into()))?;
    if path.is_empty() {
        return Err(bad("empty socket path (expected unix:PATH)".into()));
    }
    if path.starts_with('@') {
        return Err(bad(
            "abstract UNIX sockets are not supported; give a filesystem path".into(),
        ));
    }
    if path.contains('\0') {
        return Err(bad("the socket path contains a NUL byte".into()));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(bad(format!(
            "the socket path is {} bytes long; a UNIX socket path holds at most {MAX_UNIX_PATH}",
            path.len()
        )));
    }
    if path.ends_with('/') {
        return Err(bad("the socket path names a directory".into()));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_paths() {
        assert_eq!(
            parse_unix("unix:/run/ferry/mig.sock").unwrap(),
            PathBuf::from("/run/ferry/mig.sock")
        );
        assert_eq!(
            parse_unix("unix:rel.sock").unwrap(),
            PathBuf::from("rel.sock")
        );
        let longest = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH - 1));
        assert!(parse_unix(&longest).is_ok());
        assert!(is_unix("unix:/x") && !is_unix("tcp:1.2.3.4:5"));
    }

    #[test]
    fn refuses_bad_paths_with_a_reason() {
        let err = |u: &str| parse_unix(u).unwrap_err().to_string();
        assert!(err("unix:").contains("empty"));
        assert!(err("unix:@abstract").contains("abstract"));
        assert!(err("unix:/a\0b").contains("NUL"));
        assert!(err("unix:/tmp/").contains("directory"));
        assert!(err("tcp:1.2.3.4:5").contains("expected unix:PATH"));
        let long = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH));
        let e = err(&long);
        assert!(e.contains("108 bytes") && e.contains("at most 107"), "{e}");
    }
}
