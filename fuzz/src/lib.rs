//! The fuzz targets' bodies, for the libFuzzer binaries in `fuzz_targets/`
//! (cargo fuzz, nightly, `--features fuzzing`) and for the corpus replay
//! test that runs their corpora on stable (`tests/corpus_replay.rs`), so
//! every input the fuzzer kept, and every crash turned into a corpus file,
//! is a regression test in CI.

use k8s_openapi::api::core::v1::Node;

use tunmesh_cni::request::{parse_conf, parse_env, Command};
use tunmesh_cni::spec::AddResult;
use tunmesh_keygen::PrivateKey;
use tunmesh_router::dataplane::offload::{self, Coalescer, Gso, VnetHdr};
use tunmesh_router::dataplane::packet;
use tunmesh_router::source::nodes::{translate, TranslateSettings};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the replay test.
pub const TARGETS: [(&str, Target); 4] = [
    ("packet_offload", packet_offload),
    ("nodes_translate", nodes_translate),
    ("cni_request", cni_request),
    ("mesh_file", mesh_file),
];

/// Packets as the TUN device hands them over: address parsing, virtio
/// header segmentation (TSO/USO), checksum completion and coalescing must
/// never panic or write out of bounds, whatever the bytes.
pub fn packet_offload(data: &[u8]) {
    let _ = packet::dst_addr(data);
    let _ = packet::src_addr(data);
    if data.len() < offload::VNET_HDR_LEN {
        return;
    }
    let (hdr, pkt) = data.split_at(offload::VNET_HDR_LEN);
    if let Some(h) = VnetHdr::parse(hdr) {
        if let Ok(g) = Gso::new(&h, pkt) {
            let mut out = vec![0u8; 65536 + 128];
            for i in 0..g.segments().min(64) {
                let _ = g.segment(pkt, i, &mut out);
            }
        }
        let mut p = pkt.to_vec();
        let _ = offload::complete_checksum(
            &mut p,
            usize::from(h.csum_start),
            usize::from(h.csum_offset),
        );
    }
    let _ = offload::candidate(pkt);
    // Coalescing: the input split into packets at arbitrary points.
    let cut = usize::from(data[0]).min(pkt.len());
    let pkts = [&pkt[..cut], &pkt[cut..], pkt];
    let mut c = Coalescer::default();
    offload::coalesce(&mut c, pkts.len(), |i| pkts[i]);
    for g in c.groups.clone() {
        let mut head = pkts[g.head].to_vec();
        if head.len() >= offload::payload_offset(&g) {
            let _ = offload::finish_group(&g, &mut head);
        }
    }
}

/// Node objects as the API server could send them: any JSON that decodes
/// as Nodes goes through the translation to peers; it must never panic.
pub fn nodes_translate(data: &[u8]) {
    let Ok(nodes) = serde_json::from_slice::<Vec<Node>>(data) else {
        return;
    };
    let own = PrivateKey::from_bytes([7; 32]).public_key();
    let cluster = ["10.244.0.0/16".parse().expect("cidr")];
    let t = translate(
        &nodes,
        &TranslateSettings {
            own_name: "node-1",
            own_key: &own,
            own_next_key: None,
            cluster_cidrs: &cluster,
            persistent_keepalive: None,
        },
    );
    let _ = t.mesh.routes();
}

/// What a runtime could hand the CNI plugin: the environment and stdin.
/// Parsing must give a result or a spec error, never a panic.
pub fn cni_request(data: &[u8]) {
    let (env, stdin) = data.split_at(data.len() / 3);
    let env = String::from_utf8_lossy(env);
    let vars: Vec<(String, String)> = env
        .split('\n')
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let _ = parse_env(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()));
    for c in [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Version,
        Command::Status,
        Command::Gc,
    ] {
        if let Ok(conf) = parse_conf(stdin, c) {
            if let Some(prev) = &conf.prev_result {
                let _ = AddResult::from_json(prev);
            }
        }
    }
}

/// Mesh files: any text gives a mesh or an error naming the problem.
pub fn mesh_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tunmesh_router::source::file::parse(text, std::path::Path::new("fuzz.toml"));
    }
}
