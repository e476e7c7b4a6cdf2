//! docs/configuration.md's reference of `tunmesh-keygen` is its `--help`,
//! word for word (scripts/docs-help.sh regenerates it).

#[test]
fn configuration_reference_matches_help() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    for cmd in ["--help", "genkey --help", "pubkey --help", "genpair --help"] {
        let marker = format!("<!-- help: tunmesh-keygen {cmd} -->");
        let (_, tail) = doc.split_once(&marker).unwrap_or_else(|| {
            panic!("docs/configuration.md has no block for `tunmesh-keygen {cmd}`")
        });
        let body = tail
            .split_once("<!-- end help -->")
            .and_then(|(b, _)| b.split_once("```text\n"))
            .and_then(|(_, b)| b.rsplit_once("\n```"))
            .map(|(b, _)| b)
            .expect("a text block before the end marker");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunmesh-keygen"))
            .args(cmd.split_whitespace())
            .env_clear()
            .output()
            .expect("running tunmesh-keygen");
        let help = String::from_utf8(out.stdout).expect("utf-8 help");
        assert_eq!(
            body.trim_end(),
            help.trim_end(),
            "docs/configuration.md's `tunmesh-keygen {cmd}` is out of date: run scripts/docs-help.sh"
        );
    }
}
