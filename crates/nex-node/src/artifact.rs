//! Artifacts: where a `location` points, and reading one from the user's object store while
//! hashing it (the JWT pins the digest), so the digest is known the moment the last byte arrives.

use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

/// An object-store location `nats://BUCKET/key`.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// Bucket name.
    pub bucket: String,
    /// Object key.
    pub key: String,
}

impl Location {
    /// Parses `nats://BUCKET/key` (slashes around the key trimmed).
    pub fn parse(s: &str) -> Result<Location, String> {
        let rest =
            s.strip_prefix("nats://").ok_or_else(|| format!("location {s:?} must look like nats://BUCKET/key"))?;
        let (bucket, key) =
            rest.split_once('/').ok_or_else(|| format!("location {s:?} has no object key (nats://BUCKET/key)"))?;
        let key = key.trim_matches('/');
        if bucket.is_empty() || key.is_empty() {
            return Err(format!("location {s:?} must name a bucket and a key (nats://BUCKET/key)"));
        }
        Ok(Location { bucket: bucket.to_string(), key: key.to_string() })
    }
}

/// Wraps a reader, hashing and counting what passes through.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

impl<R> HashingReader<R> {
    /// Hashes `inner`; reading fails once more than `limit` bytes arrive (0 = no limit).
    pub fn new(inner: R, limit: u64) -> Self {
        HashingReader { inner, hasher: Sha256::new(), bytes: 0, limit }
    }

    /// Lowercase hex SHA-256 and byte count of what was read.
    pub fn finish(self) -> (String, u64) {
        (nex_api::jwt::hex(&self.hasher.finalize()), self.bytes)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let fresh = &buf.filled()[before..];
            this.hasher.update(fresh);
            this.bytes += fresh.len() as u64;
            if this.limit > 0 && this.bytes > this.limit {
                return Poll::Ready(Err(std::io::Error::other(format!(
                    "artifact grew past its announced size of {} bytes",
                    this.limit
                ))));
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("nats://NEXCLIFILES/echo").unwrap(),
            Location { bucket: "NEXCLIFILES".into(), key: "echo".into() }
        );
        assert!(Location::parse("http://x/y").is_err());
        assert!(Location::parse("nats://B").is_err());
        assert!(Location::parse("nats://B/").is_err());
    }

    #[tokio::test]
    async fn hashes_what_it_reads() {
        let mut r = HashingReader::new(&b"hello"[..], 0);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        let (h, n) = r.finish();
        assert_eq!(n, 5);
        assert_eq!(h, nex_api::jwt::sha256_hex(b"hello"));
    }
}
