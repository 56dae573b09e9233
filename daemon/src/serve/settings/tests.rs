//! `Config` → `ServeSettings`: a single node, a cluster head, a worker, the clamp.

use super::*;
use crate::config::{ClusterKey, HeadSharePolicy, PeerConfig};

fn config() -> Config {
    let mut cfg = Config::with_model("/models/m.gguf");
    cfg.node.name = "a".into();
    cfg.engine.ctx = 2048;
    cfg.engine.max_slots = 3;
    cfg.engine.max_queue = 5;
    cfg.engine.batch = 32;
    cfg.engine.threads = 2;
    cfg.api.shutdown_timeout_secs = 7;
    cfg
}

fn cluster(me: &str) -> Config {
    let mut cfg = config();
    cfg.node.name = me.into();
    cfg.node.listen = Some("tcp://0.0.0.0:5555".into());
    cfg.cluster.key = Some(ClusterKey::new("0123456789abcdef"));
    cfg.cluster.activations = WireActivations::F16;
    cfg.cluster.head_share = HeadSharePolicy::Off;
    cfg.peers = vec![
        PeerConfig {
            name: "a".into(),
            address: "tcp://10.0.0.1:5555".into(),
            layers: Some((0, 4)),
        },
        PeerConfig {
            name: "b".into(),
            address: "tcp://10.0.0.2:6000".into(),
            layers: Some((4, 8)),
        },
    ];
    cfg
}

#[test]
fn a_single_node_takes_the_engine_and_api_keys() {
    let mut cfg = config();
    cfg.api.key = Some(ApiKey::new("sk-1"));
    let s = ServeSettings::from_config(&cfg).expect("settings");
    assert_eq!(s.model, Some(PathBuf::from("/models/m.gguf")));
    assert_eq!(
        (s.n_ctx, s.max_slots, s.max_queue, s.batch, s.threads),
        (2048, 3, 5, 32, 2)
    );
    assert_eq!(s.shutdown_timeout, Duration::from_secs(7));
    assert_eq!(s.max_body_bytes, cfg.api.max_body_bytes);
    assert!(s.api_key.is_some_and(|k| k.matches("sk-1")));
    assert!(s.cluster.is_none());
}

#[test]
fn the_first_peer_is_the_head() {
    let s = ServeSettings::from_config(&cluster("a")).expect("settings");
    let Some(ClusterRole::Head(h)) = s.cluster else {
        panic!("not a head: {:?}", s.cluster);
    };
    assert_eq!(h.name, "a");
    assert_eq!(h.listen, "tcp://0.0.0.0:5555");
    assert_eq!(h.key, b"0123456789abcdef");
    assert!(h.f16);
    assert_eq!(h.head_share, HeadSharePolicy::Off);
    assert_eq!((h.n_ctx, h.n_slots, h.batch, h.threads), (2048, 3, 32, 2));
    let controls: Vec<String> = h.peers.iter().filter_map(|p| p.control_address()).collect();
    assert_eq!(controls, ["tcp://10.0.0.1:5556", "tcp://10.0.0.2:6001"]);
    assert_eq!(h.peers[1].layers, Some((4, 8)));
}

#[test]
fn another_peer_is_a_worker() {
    let s = ServeSettings::from_config(&cluster("b")).expect("settings");
    let Some(ClusterRole::Worker { settings: w, head }) = s.cluster else {
        panic!("not a worker: {:?}", s.cluster);
    };
    assert_eq!(head, "a (tcp://10.0.0.1:5555)");
    assert_eq!(w.name, "b");
    assert_eq!(w.model, Some(PathBuf::from("/models/m.gguf")));
    assert_eq!(w.control_listen, "tcp://0.0.0.0:5556");
    assert_eq!(w.threads, 2);
    assert_eq!(w.memory, None);
    // clamping keeps the role
    let s = ServeSettings::from_config(&cluster("b"))
        .expect("settings")
        .clamped(1024);
    assert!(matches!(s.cluster, Some(ClusterRole::Worker { .. })));
}

#[test]
fn the_offered_memory_reaches_every_role() {
    for me in ["a", "b"] {
        let mut cfg = cluster(me);
        cfg.node.memory = Some(MemorySize::parse("1.5 GiB").expect("size"));
        let s = ServeSettings::from_config(&cfg).expect("settings");
        let want = Some(3 << 29);
        assert_eq!(s.memory, want);
        match s.cluster {
            Some(ClusterRole::Head(h)) => assert_eq!((me, h.memory), ("a", want)),
            Some(ClusterRole::Worker { settings: w, .. }) => {
                assert_eq!((me, w.memory), ("b", want))
            }
            None => panic!("not in the cluster"),
        }
    }
}

#[test]
fn a_node_outside_the_peer_list_is_refused() {
    let e = ServeSettings::from_config(&cluster("z")).expect_err("not a peer");
    assert!(matches!(e, SettingsError::NotAPeer(name) if name == "z"));
    let mut cfg = cluster("a");
    cfg.cluster.key = None;
    let e = ServeSettings::from_config(&cfg).expect_err("no key");
    assert!(matches!(e, SettingsError::NoClusterKey));
}

#[test]
fn single_node_and_head_clamp_alike() {
    let single = ServeSettings::from_config(&config()).expect("settings");
    let s = single.clamped(1024);
    assert_eq!((s.n_ctx, s.max_slots, s.batch), (1024, 3, 32));
    let head = ServeSettings::from_config(&cluster("a")).expect("settings");
    let h = head.clamped(1024);
    let Some(ClusterRole::Head(hs)) = &h.cluster else {
        panic!("not a head");
    };
    assert_eq!(
        (hs.n_ctx, hs.n_slots, hs.batch),
        (h.n_ctx, h.max_slots, h.batch)
    );
    assert_eq!(hs.n_ctx, 1024);
    let mut zero = config();
    zero.engine.max_slots = 0;
    zero.engine.batch = 0;
    let s = ServeSettings::from_config(&zero)
        .expect("settings")
        .clamped(0);
    assert_eq!((s.n_ctx, s.max_slots, s.batch), (1, 1, 1));
}
