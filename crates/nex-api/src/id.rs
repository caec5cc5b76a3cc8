//! Workload ids: 20 lower-case base32hex characters (`[0-9a-v]`), like the `xid` ids of Nex.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new, time-ordered, unique workload id.
pub fn new_workload_id() -> String {
    let secs = chrono::Utc::now().timestamp() as u32;
    let rnd: [u8; 5] = rand::random();
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_add(rand::random::<u16>() as u32);
    let mut raw = [0u8; 12];
    raw[..4].copy_from_slice(&secs.to_be_bytes());
    raw[4..9].copy_from_slice(&rnd);
    raw[9..].copy_from_slice(&seq.to_be_bytes()[1..]);
    data_encoding::BASE32HEX_NOPAD.encode(&raw).to_ascii_lowercase()
}

/// True when `s` has the shape of a workload id (safe to use as a subject token and file name).
pub fn is_workload_id(s: &str) -> bool {
    s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'v').contains(&b))
}

/// The tenant of a workload: 16 lowercase hex characters of SHA-256 over its namespace, name and
/// issuer (each length-prefixed, so no two triples share an input). Host-service buckets and
/// queue groups are named after it, so a redeploy by the same issuer finds its data and shares
/// its queue group, and a stranger who copies the (public) namespace and name gets neither.
pub fn tenant_id(namespace: &str, workload_name: &str, issuer: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [namespace, workload_name, issuer] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    data_encoding::HEXLOWER.encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    #[test]
    fn tenants_differ_by_every_part_and_never_by_where_a_separator_falls() {
        let t = super::tenant_id;
        assert_eq!(t("a", "b", "A1"), t("a", "b", "A1"));
        assert_eq!(t("a", "b", "A1").len(), 16);
        assert_ne!(t("a_b", "c", "A1"), t("a", "b_c", "A1"));
        assert_ne!(t("a", "b", "A1"), t("a", "b", "A2"));
        assert_ne!(t("ab", "", "A1"), t("a", "b", "A1"));
    }

    #[test]
    fn ids_are_20_base32hex_chars_and_unique() {
        let a = super::new_workload_id();
        let b = super::new_workload_id();
        assert!(super::is_workload_id(&a), "{a}");
        assert_ne!(a, b);
    }
}
