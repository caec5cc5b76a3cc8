//! Every decoder of untrusted bytes returns an error, never a panic, whatever the input.

use proptest::prelude::*;

use nex_api::agent::{AgentDeployRequest, DeployResponse, HandshakeRequest, LogEntry, WorkloadStatusEvent};
use nex_api::control::{AuctionRequest, DeployRequest, Envelope, LameDuckRequest, StopRequest};
use nex_api::jwt::WorkloadClaims;

struct Keys {
    node: nkeys::XKey,
    sender: nkeys::XKey,
    token: String,
    sealed: String,
}

fn keys() -> &'static Keys {
    static K: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let node = nkeys::XKey::new();
        let sender = nkeys::XKey::new();
        let issuer = nkeys::KeyPair::new_account();
        let mut env = std::collections::BTreeMap::new();
        env.insert("K".to_string(), "V".to_string());
        Keys {
            token: WorkloadClaims::new("echo", Some("ab")).encode(&issuer).unwrap(),
            sealed: nex_api::env::seal(&env, &sender, &node.public_key()).unwrap(),
            node,
            sender,
        }
    })
}

fn decode_everything(bytes: &[u8]) {
    let _ = serde_json::from_slice::<DeployRequest>(bytes);
    let _ = serde_json::from_slice::<StopRequest>(bytes);
    let _ = serde_json::from_slice::<AuctionRequest>(bytes);
    let _ = serde_json::from_slice::<LameDuckRequest>(bytes);
    let _ = serde_json::from_slice::<Envelope>(bytes).map(|e| e.into_result::<serde_json::Value>());
    let _ = serde_json::from_slice::<AgentDeployRequest>(bytes).map(|r| r.validate());
    let _ = serde_json::from_slice::<DeployResponse>(bytes);
    let _ = serde_json::from_slice::<HandshakeRequest>(bytes);
    let _ = serde_json::from_slice::<LogEntry>(bytes);
    let _ = serde_json::from_slice::<WorkloadStatusEvent>(bytes);
    let _ = serde_json::from_slice::<nex_api::events::CloudEvent>(bytes);
    let text = String::from_utf8_lossy(bytes);
    if let Ok(c) = WorkloadClaims::decode(&text) {
        let _ = c.check_time(0);
    }
    let k = keys();
    let _ = nex_api::env::open(&text, &k.node, &k.sender.public_key());
    let _ = nex_api::subjects::is_valid_subscribe_subject(&text);
    let _ = nex_api::subjects::subjects_overlap(&text, "$NEX.>");
    let _ = nex_api::id::is_workload_id(&text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_json_shaped_text(s in r#"[\{\}\[\]":,a-z0-9 .\-_$>*]{0,200}"#) {
        decode_everything(s.as_bytes());
    }

    #[test]
    fn tampered_tokens(pos in 0usize..400, byte in any::<u8>()) {
        let mut b = keys().token.clone().into_bytes();
        let i = pos % b.len();
        let changed = b[i] != byte;
        b[i] = byte;
        let t = String::from_utf8_lossy(&b).to_string();
        let r = WorkloadClaims::decode(&t);
        // A changed token never verifies as the original claims with a good signature,
        // unless the change was in base64 padding bits that decode to the same bytes.
        if changed {
            if let Ok(c) = r { prop_assert_eq!(c.sub, "echo"); }
        }
    }

    #[test]
    fn tampered_envelopes(pos in 0usize..200, byte in any::<u8>()) {
        let k = keys();
        let mut b = k.sealed.clone().into_bytes();
        let i = pos % b.len();
        b[i] = byte;
        let _ = nex_api::env::open(&String::from_utf8_lossy(&b), &k.node, &k.sender.public_key());
    }
}
