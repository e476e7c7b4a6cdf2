//! The router binary refuses bad mesh files at start with a message naming
//! the file, the peer and the field, and a non-zero exit (no root needed:
//! it stops before touching the network).

use std::process::Command;

const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

fn run(name: &str, text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("tunmesh-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunmesh-router"))
        .args([
            "--mesh-file",
            path.to_str().unwrap(),
            "--state-dir",
            dir.join("state").to_str().unwrap(),
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn file(peer: &str) -> String {
    format!("[node]\nprivate_key_file = \"/nonexistent/key\"\nlisten_port = 51820\npod_cidrs = [\"10.244.1.0/24\"]\n\n[[peer]]\nname = \"node-2\"\n{peer}\n")
}

#[test]
fn each_bad_field_exits_non_zero_naming_it() {
    let good_peer = format!("public_key = \"{KEY}\"\nendpoint = \"172.28.0.12:51820\"\nallowed_ips = [\"10.244.2.0/24\"]");
    let cases = [
        (
            "key",
            good_peer.replace(KEY, "short"),
            "peer[0] (\"node-2\").public_key",
        ),
        (
            "endpoint",
            good_peer.replace("172.28.0.12:51820", "172.28.0.12"),
            "peer[0] (\"node-2\").endpoint",
        ),
        (
            "cidr",
            good_peer.replace("10.244.2.0/24", "10.244.2.0/40"),
            "peer[0] (\"node-2\").allowed_ips[0]",
        ),
        (
            "unknown",
            format!("{good_peer}\nallowed_ip = []"),
            "unknown field `allowed_ip`",
        ),
        ("syntax", format!("{good_peer}\n[[peer"), "mesh.toml"),
    ];
    for (name, peer, want) in cases {
        let (code, err) = run(name, &file(&peer));
        assert_eq!(code, 1, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
        assert!(err.contains("mesh file"), "{name}: {err}");
    }
}

#[test]
fn missing_key_file_is_named() {
    let peer = format!("public_key = \"{KEY}\"\nallowed_ips = [\"10.244.2.0/24\"]");
    let (code, err) = run("nokey", &file(&peer));
    assert_eq!(code, 1);
    assert!(
        err.contains("node.private_key_file") && err.contains("/nonexistent/key"),
        "{err}"
    );
}
